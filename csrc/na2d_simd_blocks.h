// The dot blocks of struct Kern<VB>: micro-kernels over transposed [D][W] rows with their register
// block sizes as template arguments (logits of a key row, weighted sums of shifted rows, the
// key-lane gather of dK and dV), one- and two-query-row variants.
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_blocks.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

// Micro-kernels. Rows are transposed [D][W] blocks (row stride W between head dims).

// f(std::integral_constant<int, n>{}) with n = min(count, kMax), count >= 1: the micro-kernels'
// register block sizes are template arguments, picked here from a runtime count. The lambdas
// passed in are always inline, so they compile inside the caller's x86-64 clone.
#define DCAL_LAMBDA_AI __attribute__((always_inline))
template <int kMax, typename F>
DCAL_AI static void with_block(int64_t count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) return with_block<kMax - 1>(count, f);
  }
  f(std::integral_constant<int, kMax>{});
}

// out[c] = sum_d a[d*W] * b[d*W + c] (vectors), c < NC: one query row's logits against the NC
// column offsets of one key row. NC accumulators stay in registers over the head dim.
template <typename T, int NC>
DCAL_AI static void dots_n(const T* a, const T* b, int64_t W, int64_t D, vec_t<T>* out) {
  vec_t<T> acc[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) acc[c] = vec_t<T>{};
  for (int64_t d = 0; d < D; ++d) {
    const vec_t<T> x = loadu(a + d * W);
    const T* bd = b + d * W;
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[c] += x * loadu(bd + c);
  }
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) out[c] = acc[c];
}

template <typename T>
DCAL_AI static void dots(const T* a, const T* b, int64_t W, int64_t D, int nc, vec_t<T>* out) {
  for (int c0 = 0; c0 < nc; c0 += 8)
    with_block<8>(nc - c0, [&](auto n) DCAL_LAMBDA_AI { dots_n<T, decltype(n)::value>(a, b + c0, W, D, out + c0); });
}

// o[d0 + e] += sum_{c < n} w[c] * b[c + (d0 + e) * W] for e < DB: one key row's share of a
// weighted sum of shifted rows (P @ V, dS @ K) for one lane block, DB accumulators in registers.
template <typename T, int DB>
DCAL_AI static void wacc_n(int n, const vec_t<T>* w, const T* b, int64_t W, int64_t d0, vec_t<T>* o) {
  vec_t<T> acc[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) acc[e] = o[d0 + e];
  for (int c = 0; c < n; ++c) {
    const vec_t<T> x = w[c];
    const T* bc = b + c + d0 * W;
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) acc[e] += x * loadu(bc + e * W);
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) o[d0 + e] = acc[e];
}

template <typename T>
DCAL_AI static void wacc(int n, const vec_t<T>* w, const T* b, int64_t W, int64_t D, vec_t<T>* o) {
  for (int64_t d0 = 0; d0 < D; d0 += 8)
    with_block<8>(D - d0, [&](auto k) DCAL_LAMBDA_AI { wacc_n<T, decltype(k)::value>(n, w, b, W, d0, o); });
}

// Shifted vectors from aligned loads (64-byte kernels). A lane block's key (value) vector at column
// offset O takes columns O .. O + L - 1 of the block: as an unaligned load it splits two cache lines
// for every O that is not a multiple of L. For |O| <= L the same lanes come from the aligned
// vectors before (a), at (b) and after (c) the block through one in-register shift (valign), so a
// kernel's ks offsets cost three aligned loads and ks - 1 shifts. The lanes are the same elements
// as the unaligned loads', so every result is the same bits.
template <typename T, int O, size_t... J>
DCAL_AI static vec_t<T> shifted_(vec_t<T> a, vec_t<T> b, vec_t<T> c, std::index_sequence<J...>) {
  constexpr int L = Vec<T>::L;
  static_assert(O >= -L && O <= L, "a shift reaches one vector on either side");
  if constexpr (O == 0)
    return b;
  else if constexpr (O < 0)
    return __builtin_shufflevector(a, b, (L + O + static_cast<int>(J))...);
  else
    return __builtin_shufflevector(b, c, (O + static_cast<int>(J))...);
}
template <typename T, int O>
DCAL_AI static vec_t<T> shifted(vec_t<T> a, vec_t<T> b, vec_t<T> c) {
  return shifted_<T, O>(a, b, c, std::make_index_sequence<Vec<T>::L>{});
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N - 1, unrolled (compile-time offsets).
template <typename F, int... I>
DCAL_AI static void unroll_(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
DCAL_AI static void unroll(F&& f) {
  unroll_(f, std::make_integer_sequence<int, N>{});
}

// Centred windows (zero and mask borders: every lane block's offsets are -nc/2 .. nc/2) with at
// most 7 offsets take the shifted path on the 64-byte kernels: f(std::integral_constant<int, nc>{})
// and true, or false (the caller's unaligned loads: clamp borders, wider kernels, 32-byte vectors).
template <typename F>
DCAL_AI static bool with_centred(int cmin, int nc, F&& f) {
  if constexpr (VB != 64) {
    return false;
  } else {
    if (cmin != -(nc / 2)) return false;
    switch (nc) {
      case 1:
        f(std::integral_constant<int, 1>{});
        return true;
      case 3:
        f(std::integral_constant<int, 3>{});
        return true;
      case 5:
        f(std::integral_constant<int, 5>{});
        return true;
      case 7:
        f(std::integral_constant<int, 7>{});
        return true;
      default:
        return false;
    }
  }
}

// The three aligned vectors around column 0 of a lane block (b: aligned), as shifted() takes them;
// the outer two only where an offset reaches them.
template <typename T, int NC>
DCAL_AI static void around(const T* b, vec_t<T>& lo, vec_t<T>& mid, vec_t<T>& hi) {
  constexpr int L = Vec<T>::L;
  mid = loadu(b);
  if constexpr (NC > 1) {
    lo = loadu(b - L);
    hi = loadu(b + L);
  } else {
    lo = hi = vec_t<T>{};
  }
}

// dots2_n / dots_n for a centred window of NC offsets: b is the key row at the lane block's column
// 0 (aligned), offsets -NC/2 .. NC/2 by shifts.
template <typename T, int NC>
DCAL_AI static void dots2_c(const T* a0, const T* a1, const T* b, int64_t W, int64_t D, vec_t<T>* out0,
                            vec_t<T>* out1) {
  constexpr int H = NC / 2;
  vec_t<T> acc0[NC], acc1[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) acc0[c] = acc1[c] = vec_t<T>{};
  for (int64_t d = 0; d < D; ++d) {
    const vec_t<T> x0 = loadu(a0 + d * W), x1 = loadu(a1 + d * W);
    vec_t<T> lo, mid, hi;
    around<T, NC>(b + d * W, lo, mid, hi);
    unroll<NC>([&](auto c) DCAL_LAMBDA_AI {
      const vec_t<T> y = shifted<T, decltype(c)::value - H>(lo, mid, hi);
      acc0[c] += x0 * y;
      acc1[c] += x1 * y;
    });
  }
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    out0[c] = acc0[c];
    out1[c] = acc1[c];
  }
}
template <typename T, int NC>
DCAL_AI static void dots_c(const T* a, const T* b, int64_t W, int64_t D, vec_t<T>* out) {
  constexpr int H = NC / 2;
  vec_t<T> acc[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) acc[c] = vec_t<T>{};
  for (int64_t d = 0; d < D; ++d) {
    const vec_t<T> x = loadu(a + d * W);
    vec_t<T> lo, mid, hi;
    around<T, NC>(b + d * W, lo, mid, hi);
    unroll<NC>([&](auto c) DCAL_LAMBDA_AI { acc[c] += x * shifted<T, decltype(c)::value - H>(lo, mid, hi); });
  }
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) out[c] = acc[c];
}

// Two query rows against one key row (rows i and i + 1 share all but one key row of their
// windows): each shifted key (value) vector loaded once serves both, which cuts the loads per FMA
// from 8/7 to 11/14 for the logits and from 9/8 to 6/8 for the weighted sums.
template <typename T, int NC>
DCAL_AI static void dots2_n(const T* a0, const T* a1, const T* b, int64_t W, int64_t D, vec_t<T>* out0,
                            vec_t<T>* out1) {
  vec_t<T> acc0[NC], acc1[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) acc0[c] = acc1[c] = vec_t<T>{};
  for (int64_t d = 0; d < D; ++d) {
    const vec_t<T> x0 = loadu(a0 + d * W), x1 = loadu(a1 + d * W);
    const T* bd = b + d * W;
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      const vec_t<T> y = loadu(bd + c);
      acc0[c] += x0 * y;
      acc1[c] += x1 * y;
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    out0[c] = acc0[c];
    out1[c] = acc1[c];
  }
}

template <typename T>
DCAL_AI static void dots2(const T* a0, const T* a1, const T* b, int64_t W, int64_t D, int nc, vec_t<T>* out0,
                          vec_t<T>* out1) {
  constexpr int kNC = VB == 64 ? 8 : 4;  // 2 * kNC accumulators (a kernel of 7: one pass on AVX-512)
  for (int c0 = 0; c0 < nc; c0 += kNC)
    with_block<kNC>(nc - c0, [&](auto n) DCAL_LAMBDA_AI {
      dots2_n<T, decltype(n)::value>(a0, a1, b + c0, W, D, out0 + c0, out1 + c0);
    });
}

template <typename T, int DB>
DCAL_AI static void wacc2_n(int n, const vec_t<T>* w0, const vec_t<T>* w1, const T* b, int64_t W, int64_t d0,
                            vec_t<T>* o0, vec_t<T>* o1) {
  vec_t<T> acc0[DB], acc1[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) {
    acc0[e] = o0[d0 + e];
    acc1[e] = o1[d0 + e];
  }
  for (int c = 0; c < n; ++c) {
    const vec_t<T> x0 = w0[c], x1 = w1[c];
    const T* bc = b + c + d0 * W;
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) {
      const vec_t<T> y = loadu(bc + e * W);
      acc0[e] += x0 * y;
      acc1[e] += x1 * y;
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) {
    o0[d0 + e] = acc0[e];
    o1[d0 + e] = acc1[e];
  }
}

template <typename T>
DCAL_AI static void wacc2(int n, const vec_t<T>* w0, const vec_t<T>* w1, const T* b, int64_t W, int64_t D, vec_t<T>* o0,
                          vec_t<T>* o1) {
  for (int64_t d0 = 0; d0 < D; d0 += 4)
    with_block<4>(D - d0, [&](auto k) DCAL_LAMBDA_AI { wacc2_n<T, decltype(k)::value>(n, w0, w1, b, W, d0, o0, o1); });
}

// dst[(d0 + e) * W] += sum_t w_t[0:L] * b_t[(d0 + e) * W] for e < DB: the key-lane gather of dK
// and dV (w_t: a row of dS or P shifted by the offset, b_t: Q or dO shifted alike).
template <typename T, int DB>
DCAL_AI static void gather_n(int n, const T* const* w, const T* const* b, int64_t W, int64_t d0, T* dst) {
  vec_t<T> acc[DB];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) acc[e] = loadu(dst + (d0 + e) * W);
  for (int t = 0; t < n; ++t) {
    const vec_t<T> x = loadu(w[t]);
    const T* bt = b[t] + d0 * W;
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) acc[e] += x * loadu(bt + e * W);
  }
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e) storeu(dst + (d0 + e) * W, acc[e]);
}

template <typename T>
DCAL_AI static void gather(int n, const T* const* w, const T* const* b, int64_t W, int64_t D, T* dst) {
  for (int64_t d0 = 0; d0 < D; d0 += 8)
    with_block<8>(D - d0, [&](auto k) DCAL_LAMBDA_AI { gather_n<T, decltype(k)::value>(n, w, b, W, d0, dst); });
}
