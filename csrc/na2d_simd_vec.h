// The vector layer of struct Kern<VB>: unaligned loads and stores, splat, max, exp of every
// lane, and the in-register L x L transposes (token-major <-> head-dim-major blocks).
// A section of struct Kern<VB> in na2d_cpu_simd.cpp, included inside its body (so it is
// compiled inside that file's x86-64 clones); not a header of its own.
#ifndef DCAL_NA2D_SIMD_KERN
#error "na2d_simd_vec.h is a section of struct Kern in na2d_cpu_simd.cpp"
#endif

template <typename T>
DCAL_AI static vec_t<T> loadu(const T* p) {
  vec_t<T> r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
template <typename T>
DCAL_AI static void storeu(T* p, vec_t<T> x) {
  std::memcpy(p, &x, sizeof x);
}
template <typename T>
DCAL_AI static vec_t<T> splat(T s) {
  return vec_t<T>{} + s;
}
template <typename T>
DCAL_AI static vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}

// exp of every lane: cpu::exp_poly's reduction, polynomial and clamps.
DCAL_AI static vec_t<float> vexp(vec_t<float> x) { return cpu::exp_poly_f32<vec_t<float>, mask_t<float>>(x); }
DCAL_AI static vec_t<double> vexp(vec_t<double> x) { return cpu::exp_poly_f64<vec_t<double>, mask_t<double>>(x); }

// In-register transpose of an L x L block (r[i][j] -> r[j][i]), log2(L) stages: the stage of
// half-width h swaps, in every aligned 2h x 2h block, the top-right h x h block with the
// bottom-left one (lanes with bit h set in r[i] trade places with lanes without it in r[i + h]).
template <typename V, int L, int h, size_t... J>
DCAL_AI static V swap_lo(V a, V b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, ((J & h) ? static_cast<int>(J) - h + L : static_cast<int>(J))...);
}
template <typename V, int L, int h, size_t... J>
DCAL_AI static V swap_hi(V a, V b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, ((J & h) ? static_cast<int>(J) + L : static_cast<int>(J) + h)...);
}
template <typename V, int L, int h>
DCAL_AI static void transpose_stage(V* r) {
  if constexpr (h >= 1) {
    for (int i = 0; i < L; ++i)
      if ((i & h) == 0) {
        const V a = r[i], b = r[i + h];
        r[i] = swap_lo<V, L, h>(a, b, std::make_index_sequence<L>{});
        r[i + h] = swap_hi<V, L, h>(a, b, std::make_index_sequence<L>{});
      }
    transpose_stage<V, L, h / 2>(r);
  }
}
template <typename V>
DCAL_AI static void transpose(V* r) {
  constexpr int L = sizeof(V) / sizeof(r[0][0]);
  transpose_stage<V, L, L / 2>(r);
}

// dst[e * ds + l] = src[l * ss + e] for an L x L block (token-major <-> head-dim-major), read as
// storage type A and written as B (one of them the compute type; see widen / narrow below).
template <typename A, typename B>
DCAL_AI static void transpose_block(const A* src, int64_t ss, B* dst, int64_t ds) {
  using T = std::conditional_t<std::is_same_v<A, bf16>, B, A>;
  constexpr int L = Vec<T>::L;
  vec_t<T> r[L];
  for (int l = 0; l < L; ++l) r[l] = loadw<T>(src + l * ss);
  transpose(r);
  for (int l = 0; l < L; ++l) storen<B, T>(dst + l * ds, r[l]);
}

// Storage types. The kernels compute in T (fp32 or fp64) whatever the tensors hold; a tensor of
// storage type S is read through widen / loadw (S -> T, where its rows are staged) and written
// through narrow / storen (T -> S, where outputs leave). S = T is the identity; S = bf16 (the
// bits of a bfloat16, compute type float) widens exactly (the bits shifted up) and narrows by
// round-to-nearest-even on the integer bits, as torch's conversion does: inf, negative zero and
// denormals are kept (AVX-512 BF16's vcvtneps2bf16 would flush denormals), every NaN becomes
// 0xffff.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, bf16>, float, S>;

template <typename T, typename S>
DCAL_AI static T widen(S x) {
  if constexpr (std::is_same_v<S, T>) {
    return x;
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>);
    return std::bit_cast<float>(static_cast<uint32_t>(x) << 16);
  }
}
template <typename S, typename T>
DCAL_AI static S narrow(T x) {
  if constexpr (std::is_same_v<S, T>) {
    return x;
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>);
    const uint32_t u = std::bit_cast<uint32_t>(x);
    return x != x ? bf16(0xffff) : static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
// L elements of S at p, widened to a vector of T.
template <typename T, typename S>
DCAL_AI static vec_t<T> loadw(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return loadu(p);
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>);
    using h_t = typename Bf16W<VB>::h;
    using w_t = typename Bf16W<VB>::w;
    h_t h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_bit_cast(vec_t<float>, __builtin_convertvector(h, w_t) << 16);
  }
}
// The lanes of x narrowed to S, stored at p (L elements).
template <typename S, typename T>
DCAL_AI static void storen(S* p, vec_t<T> x) {
  if constexpr (std::is_same_v<S, T>) {
    storeu(p, x);
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>);
    using h_t = typename Bf16W<VB>::h;
    using w_t = typename Bf16W<VB>::w;
    const w_t u = __builtin_bit_cast(w_t, x);
    w_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = x != x ? w_t{} + 0xffffu : r;
    const h_t h = __builtin_convertvector(r, h_t);
    std::memcpy(p, &h, sizeof h);
  }
}
