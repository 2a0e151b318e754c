// 2-D neighborhood attention on CPU, fp32 and fp64: register-blocked kernels with the queries of a
// map row in the SIMD lanes.
//
// Why this shape. A query's window is ks x ks keys; along a map row the window slides by one key
// per query. With L consecutive queries (j0 .. j0 + L - 1) of one row in the lanes of a vector,
// the key at column offset c of every lane's window is the key row's column j0 + c + lane: one
// unaligned load from the key row stored transposed ([D][columns]). So
//   logits  S[u][c]  = sum_d Qt[d][j0:] * Kt_u[d][j0 + c:]        (u: window row, c: column offset)
//   output  Ot[d]    = sum_{u,c} P[u][c] * Vt_u[d][j0 + c:]
// are plain vector FMAs with the accumulators in registers (ks offsets per key row for the
// logits; a block of head dims for the output), every lane's softmax is elementwise across the
// ks^2 logit vectors, and the bias of (u, c) is one scalar for all lanes (it depends only on the
// offsets). No logit outside a window is computed except at clamp-mode borders, where the lanes'
// windows shift by different amounts and the union of their offsets is computed and masked.
//
// Dilation: the positions of one residue (gx, gy) mod dil form a sub-grid on which a dilated
// window is the ordinary window of the sub-grid (zero/mask: centred, off the map exactly where the
// sub-grid index leaves [0, n_g); clamp: NATTEN's rule is defined that way; na2d.h), and the bias
// offset (key - query) / dil is the sub-grid offset. So each (batch, head, gx, gy) slice is an
// undilated problem: the kernels below work on slice coordinates and reach memory through strides
// scaled by the dilation.
//
// Key and value rows are staged transposed, zero-padded by ks - 1 + L columns on each side (zero
// mode's off-map keys are exactly such zeros; off-map rows are zero rows), in a ring of ks rows
// per thread that follows the query row down the slice: each key row is staged once per pass.
//
// Backward, one thread per slice, query rows in order: P from the logits and the forward's
// logsumexp, dP = dO . V as the logits, dS = P * (dP - delta), dQ as the output, and the bias
// gradient summed per (row offset, column offset) in vector accumulators. dK and dV are gathered
// with the KEYS in the lanes: the query row's P and dS are kept for the whole row, indexed by
// (u, c) and query column, so key column kc = k0 + lane receives from query column kc - c:
//   dKt_u[d][k0:] += sum_c dS[u][c][k0 - c:] * Qt[d][k0 - c:]   (and dV from P and dO)
// accumulated in registers over c, into a ring of transposed key-row accumulators that is written
// out when the key row leaves the window. Every write has one owner and a fixed order: the
// results are deterministic, bit for bit, whatever the thread count.
#include "na2d_cpu_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

// Vectors only cross always-inline calls, inside one clone or entry, so the ABI note does not
// apply (also to cpu_math.h's exp, instantiated here with this file's vector types).
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu_math.h"
#define DCAL_NA2D_MATH_ONLY
#include "na2d.h"

#define DCAL_AI [[gnu::always_inline]] inline

namespace dcal {
namespace na2d_simd {
namespace {

using na2d::kClamp;
using na2d::kMask;
using na2d::window_start;
// Vectors of VB bytes (GCC vector extensions): 32 bytes (8 floats, 4 doubles) on the x86-64-v3 and
// baseline clones (AVX2, or two SSE halves), 64 bytes (16 floats, 8 doubles: the whole AVX-512
// registers) on the x86-64-v4 entry points. Every lane's arithmetic is the same sequence of
// operations at either width. Arrays of them live in AlignedBuf (std::vector would drop the
// type's alignment).
template <typename T, int VB>
struct VecW {
  typedef T v __attribute__((vector_size(VB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> m __attribute__((vector_size(VB)));
  static constexpr int L = VB / static_cast<int>(sizeof(T));
};

// n vectors (or masks) on a 64-byte boundary, zero-initialised.
template <typename E>
class AlignedBuf {
 public:
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(p_); }
  void resize(size_t n) {
    std::free(p_);
    p_ = static_cast<E*>(std::aligned_alloc(64, (n * sizeof(E) + 63) / 64 * 64));
    if (p_ == nullptr && n != 0) throw std::bad_alloc();
    std::memset(static_cast<void*>(p_), 0, n * sizeof(E));
    n_ = n;
  }
  E* data() { return p_; }
  const E* data() const { return p_; }
  E& operator[](size_t i) { return p_[i]; }
  E* begin() { return p_; }
  E* end() { return p_ + n_; }

 private:
  E* p_ = nullptr;
  size_t n_ = 0;
};

template <typename T>
struct FwdArgs {
  Geo g;
  In<T> q, k, v;
  const T* rpb;
  Out<T> out;
  T* lse;
  T scale;
  int band;
  std::atomic<bool>* nonfinite;  // set when a staged input holds an inf or a NaN (see fwd in the header)
};

template <typename T>
struct BwdArgs {
  Geo g;
  In<T> dout, q, k, v, out;
  const T* rpb;
  const T* lse;
  Out<T> dq, dk, dv;
  T* bias_part;
  T scale;
  std::atomic<bool>* nonfinite;
};

// The kernels at one vector width: VB bytes per vector (32 or 64). Everything in here is always
// inline and is compiled inside the entry point that instantiates it (fwd_tasks, bwd_tasks: the
// x86-64 clones at 32 bytes, the x86-64-v4 functions at 64).
template <int VB>
struct Kern {
  template <typename T>
  using Vec = VecW<T, VB>;
  template <typename T>
  using vec_t = typename Vec<T>::v;
  template <typename T>
  using mask_t = typename Vec<T>::m;

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

  // dst[e * ds + l] = src[l * ss + e] for an L x L block (token-major <-> head-dim-major).
  template <typename T>
  DCAL_AI static void transpose_block(const T* src, int64_t ss, T* dst, int64_t ds) {
    constexpr int L = Vec<T>::L;
    vec_t<T> r[L];
    for (int l = 0; l < L; ++l) r[l] = loadu(src + l * ss);
    transpose(r);
    for (int l = 0; l < L; ++l) storeu(dst + l * ds, r[l]);
  }

// ---------------------------------------------------------------------------------------------
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
  DCAL_AI static void wacc2(int n, const vec_t<T>* w0, const vec_t<T>* w1, const T* b, int64_t W, int64_t D,
                            vec_t<T>* o0, vec_t<T>* o1) {
    for (int64_t d0 = 0; d0 < D; d0 += 4)
      with_block<4>(D - d0,
                    [&](auto k) DCAL_LAMBDA_AI { wacc2_n<T, decltype(k)::value>(n, w0, w1, b, W, d0, o0, o1); });
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

  // ---------------------------------------------------------------------------------------------
  // Slices, staging and the lanes' windows.

  struct Slice {
    int64_t bh;
    int gx, gy, nx, ny;
  };

  DCAL_AI static Slice slice_of(const Geo& g, int64_t sl) {
    const int64_t dd = int64_t{g.dil} * g.dil;
    Slice s;
    s.bh = sl / dd;
    s.gx = static_cast<int>((sl % dd) / g.dil);
    s.gy = static_cast<int>(sl % g.dil);
    s.nx = na2d::subgrid_len(s.gx, static_cast<int>(g.X), g.dil);
    s.ny = na2d::subgrid_len(s.gy, static_cast<int>(g.Y), g.dil);
    return s;
  }

  // Element offset of slice position (r, c), head dim 0, in a tensor with strides t.
  template <typename S>
  DCAL_AI static int64_t offset(const S& t, const Geo& g, const Slice& s, int64_t r, int64_t c) {
    return (s.bh / g.H) * t.sb + (s.bh % g.H) * t.sh + (s.gx + g.dil * r) * t.sx + (s.gy + g.dil * c) * t.sy;
  }

  // Padding of a staged row on each side: the widest column offset plus one vector of lanes,
  // rounded up to whole vectors, so a lane block's query vectors are aligned (the row stride W is a
  // whole number of cache lines and the rows start on 64-byte boundaries).
  DCAL_AI static int pad_of(int ks, int L) { return (ks - 1 + L + L - 1) / L * L; }

  // dst [D][W] <- row r of the slice, transposed, columns at dst[PAD + c]; zeros off the map.
  template <typename T>
  DCAL_AI static void stage(const In<T>& t, const Geo& g, const Slice& s, int r, int64_t W, int PAD, T* dst) {
    const int64_t D = g.D, ny = s.ny;
    if (r < 0 || r >= s.nx) {
      std::fill(dst, dst + D * W, T(0));
      return;
    }
    for (int64_t d = 0; d < D; ++d) {
      std::fill(dst + d * W, dst + d * W + PAD, T(0));
      std::fill(dst + d * W + PAD + ny, dst + (d + 1) * W, T(0));
    }
    const T* src = t.p + offset(t, g, s, r, 0);
    const int64_t cs = int64_t{g.dil} * t.sy;
    if (t.sd != 1 && (cs == 1 || std::abs(cs) < std::abs(t.sd))) {  // columns closer than head dims
      for (int64_t d = 0; d < D; ++d) {
        const T* sd = src + d * t.sd;
        T* row = dst + d * W + PAD;
        if (cs == 1) {  // channels-first maps: each head dim's row is contiguous
          std::copy(sd, sd + ny, row);
        } else {
          for (int64_t c = 0; c < ny; ++c) row[c] = sd[c * cs];
        }
      }
    } else {
      constexpr int L = Vec<T>::L;
      int64_t c = 0;
      if (t.sd == 1)  // L tokens x L head dims at a time, transposed in registers
        for (; c + L <= ny; c += L) {
          int64_t d = 0;
          for (; d + L <= D; d += L) transpose_block(src + c * cs + d, cs, dst + d * W + PAD + c, W);
          for (; d < D; ++d)
            for (int l = 0; l < L; ++l) dst[d * W + PAD + c + l] = src[(c + l) * cs + d];
        }
      for (; c < ny; ++c) {
        const T* e = src + c * cs;
        T* col = dst + PAD + c;
        for (int64_t d = 0; d < D; ++d) col[d * W] = e[d * t.sd];
      }
    }
  }

  template <typename T>
  DCAL_AI static bool finite(vec_t<T> probe) {
    bool ok = true;
    for (int l = 0; l < Vec<T>::L; ++l) ok &= probe[l] == 0;
    return ok;
  }

  // Sum of x - x over the columns of a staged row: 0 when every element is finite, NaN when one is
  // an inf or a NaN (the padding is zeros; the row is in L1 right after staging).
  template <typename T>
  DCAL_AI static vec_t<T> probe_row(const T* dst, int64_t W, int64_t D, int PAD, int ny) {
    constexpr int L = Vec<T>::L;
    vec_t<T> acc{};
    for (int64_t d = 0; d < D; ++d)
      for (int c = 0; c < ny; c += L) {
        const vec_t<T> x = loadu(dst + d * W + PAD + c);
        acc += x - x;
      }
    return acc;
  }

  // Slice row r of dst <- a transposed [D][W] row (columns at src[PAD + c]).
  template <typename T>
  DCAL_AI static void unstage(const T* src, const Geo& g, const Slice& s, int r, int64_t W, int PAD,
                              const Out<T>& dst) {
    const int64_t D = g.D, ny = s.ny, cs = int64_t{g.dil} * dst.sy;
    T* base = dst.p + offset(dst, g, s, r, 0);
    if (dst.sd != 1 && (cs == 1 || std::abs(cs) < std::abs(dst.sd))) {
      for (int64_t d = 0; d < D; ++d) {
        const T* row = src + d * W + PAD;
        T* o = base + d * dst.sd;
        if (cs == 1) {
          std::copy(row, row + ny, o);
        } else {
          for (int64_t c = 0; c < ny; ++c) o[c * cs] = row[c];
        }
      }
    } else {
      constexpr int L = Vec<T>::L;
      int64_t c = 0;
      if (dst.sd == 1)
        for (; c + L <= ny; c += L) {
          int64_t d = 0;
          for (; d + L <= D; d += L) transpose_block(src + d * W + PAD + c, W, base + c * cs + d, cs);
          for (; d < D; ++d)
            for (int l = 0; l < L; ++l) base[(c + l) * cs + d] = src[d * W + PAD + c + l];
        }
      for (; c < ny; ++c) {
        const T* col = src + PAD + c;
        T* o = base + c * cs;
        for (int64_t d = 0; d < D; ++d) o[d * dst.sd] = col[d * W];
      }
    }
  }

  // Lanes l < nl of the vectors o[d] -> queries (i, j0 + l) of dst.
  template <typename T>
  DCAL_AI static void store_lanes(const vec_t<T>* o, int nl, const Geo& g, const Slice& s, int i, int j0,
                                  const Out<T>& dst) {
    T* base = dst.p + offset(dst, g, s, i, j0);
    const int64_t cs = int64_t{g.dil} * dst.sy;
    constexpr int L = Vec<T>::L;
    if (cs == 1 && nl == L) {
      for (int64_t d = 0; d < g.D; ++d) storeu(base + d * dst.sd, o[d]);
      return;
    }
    if (dst.sd == 1 && nl == L && g.D % L == 0) {
      for (int64_t d0 = 0; d0 < g.D; d0 += L) {
        vec_t<T> r[L];
        for (int l = 0; l < L; ++l) r[l] = o[d0 + l];
        transpose(r);
        for (int l = 0; l < L; ++l) storeu(base + l * cs + d0, r[l]);
      }
      return;
    }
    for (int l = 0; l < nl; ++l) {
      T* q = base + l * cs;
      for (int64_t d = 0; d < g.D; ++d) q[d * dst.sd] = o[d][l];
    }
  }

  // Column offsets (key column - query column) of the windows of queries ja .. jb (clipped to the
  // slice): [*lo, *hi]. Centred windows (zero, mask) have the fixed offsets -ks/2 .. ks/2.
  DCAL_AI static void offset_range(int ja, int jb, int ny, int ks, int border, int* lo, int* hi) {
    if (border != kClamp) {
      *lo = -(ks / 2);
      *hi = ks / 2;
      return;
    }
    ja = std::max(ja, 0);
    jb = std::min(jb, ny - 1);
    int a = INT_MAX, b = INT_MIN;
    for (int j = ja; j <= jb; ++j) {
      const int o = window_start(j, ny, ks, border) - j;
      a = std::min(a, o);
      b = std::max(b, o + ks - 1);
    }
    *lo = a;
    *hi = b;
  }

  // The window's column offsets for the lanes of queries j0 .. j0 + nl - 1: *cmin and *nc (their
  // union) and, per offset, which lanes it belongs to (clamp windows differ near the borders; mask
  // mode leaves off-map keys out; lanes >= nl belong to no query).
  template <typename T>
  DCAL_AI static void lane_windows(int j0, int nl, int ny, int ks, int border, int* cmin, int* nc, mask_t<T>* valid) {
    constexpr int L = Vec<T>::L;
    int lo, hi;
    offset_range(j0, j0 + nl - 1, ny, ks, border, &lo, &hi);
    *cmin = lo;
    *nc = hi - lo + 1;
    int off[L];
    for (int l = 0; l < nl; ++l) off[l] = window_start(j0 + l, ny, ks, border) - (j0 + l);
    for (int c = 0; c < *nc; ++c) {
      mask_t<T> m{};
      const int oc = lo + c;
      for (int l = 0; l < nl; ++l) {
        const int key = j0 + l + oc;
        const bool in = oc >= off[l] && oc < off[l] + ks && (border != kMask || (key >= 0 && key < ny));
        m[l] = in ? -1 : 0;
      }
      valid[c] = m;
    }
  }

  // Query rows go in pairs (kPair); the key ring holds the union of a pair's windows.
  static constexpr int kPair = 2;

  // A key row of a pair's windows: r and its window row for query row 0 and 1 (u0, u1; -1 where
  // that query row does not take r).
  struct KeyRow {
    int r, u0, u1;
  };

  // Per-thread buffers, sized for the widest slice. Everything that runs per element is always
  // inline, so it is compiled inside the x86-64 clones of fwd_tasks / bwd_tasks.
  template <typename T>
  struct Work {
    int64_t W, row;                // row: one staged [D][W] row
    int PAD, nb, RK;               // nb: lane blocks of the widest slice row; RK: ring slots
    AlignedBuf<T> K, V, Qt, dOt;   // K, V: ring of RK transposed rows; Qt, dOt: the pair's rows
    std::vector<T> dK, dV;         // backward: ring of transposed key-row gradient accumulators
    std::vector<T> P, dS;          // backward: [kPair][ks][NCR][W] rows of P and scale * dS of the pair
    std::vector<T> delta, lse;     // backward: [W] per query column, one query row
    int coff, NCR;                 // column offsets -coff .. coff kept in the rows of P and dS
    AlignedBuf<vec_t<T>> S, dP;    // [kPair][nb][ks][2ks-1] logit-shaped vectors of the pair
    AlignedBuf<vec_t<T>> o, bias;  // o: [kPair][nb][D] output-shaped vectors; bias: [2ks-1]^2 sums
    AlignedBuf<mask_t<T>> valid;   // [nb][2ks-1] lanes of each block's column offsets
    std::vector<int> cmin, nc;     // [nb] first column offset and offset count of each block
    std::vector<const T*> wp, bp;
    std::vector<int> slot, us;  // ring slot -> key row; [kPair][ks] window rows taken
    std::vector<KeyRow> keys;   // [ks + kPair - 1] key rows of a pair's windows
    vec_t<T> probe{};           // finiteness probe (probe_row): of v in the forward, of every input in the
                                // backward (a non-finite q or k reaches only its own windows' logits)
    bool backward;
    std::vector<int> klo, khi;  // [nb] column offsets reaching each key block (backward)

    Work(const Geo& g, bool backward_) : backward(backward_) {
      constexpr int L = Vec<T>::L;
      const int ks = g.ks, NC = 2 * ks - 1;
      PAD = pad_of(ks, L);
      RK = ks + kPair - 1;
      coff = g.border == kClamp ? ks - 1 : ks / 2;  // centred windows never leave -ks/2 .. ks/2
      NCR = 2 * coff + 1;
      const int64_t ny_max = na2d::subgrid_len(0, static_cast<int>(g.Y), g.dil);
      nb = static_cast<int>((ny_max + L - 1) / L);
      // Row stride: whole cache lines, an odd number of them, so the D rows of a staged block spread
      // over every set of the L1 instead of aliasing into a few (a power-of-two stride would).
      constexpr int64_t kLine = 64 / sizeof(T);
      W = (ny_max + 2 * PAD + kLine - 1) / kLine * kLine;
      if ((W / kLine) % 2 == 0) W += kLine;
      row = g.D * W;
      K.resize(RK * row);
      V.resize(RK * row);
      Qt.resize(kPair * row);
      S.resize(int64_t{kPair} * nb * ks * NC);
      o.resize(int64_t{kPair} * nb * g.D);
      valid.resize(nb * NC);
      cmin.resize(nb);
      nc.resize(nb);
      slot.assign(RK, INT_MIN);
      us.resize(kPair * ks);
      keys.resize(RK);
      klo.resize(nb);
      khi.resize(nb);
      if (backward) {
        dOt.resize(kPair * row);
        dP.resize(int64_t{kPair} * nb * ks * NC);
        dK.resize(RK * row);
        dV.resize(RK * row);
        P.resize(int64_t{kPair} * ks * NCR * W);
        dS.resize(int64_t{kPair} * ks * NCR * W);
        delta.resize(W);
        lse.resize(W);
        bias.resize(NC * NC);
        wp.resize(kPair * NC);
        bp.resize(kPair * NC);
      }
    }

    DCAL_AI int slot_of(int r) const { return ((r % RK) + RK) % RK; }
    DCAL_AI const T* krow(int r) const { return K.data() + slot_of(r) * row + PAD; }
    DCAL_AI const T* vrow(int r) const { return V.data() + slot_of(r) * row + PAD; }

    // The lane blocks' windows of a slice row (the same for every row of the slice), and the column
    // offsets through which queries reach each block of keys (the backward's dK, dV gather).
    DCAL_AI void windows(const Geo& g, const Slice& s) {
      constexpr int L = Vec<T>::L;
      const int ks = g.ks, NC = 2 * ks - 1;
      for (int b = 0; b * L < s.ny; ++b) {
        const int j0 = b * L;
        lane_windows<T>(j0, std::min(L, s.ny - j0), s.ny, ks, g.border, &cmin[b], &nc[b], valid.data() + b * NC);
        offset_range(j0 - (ks - 1), j0 + L - 1 + (ks - 1), s.ny, ks, g.border, &klo[b], &khi[b]);
      }
    }

    // Stage key rows lo .. hi - 1 into the ring (those not already there); evict(slot) runs first
    // on a slot whose row is replaced.
    template <typename Evict>
    DCAL_AI void stage_rows(const Geo& g, const Slice& s, const In<T>& k, const In<T>& v, int lo, int hi, Evict evict) {
      for (int r = lo; r < hi; ++r) {
        const int sl = slot_of(r);
        if (slot[sl] == r) continue;
        if (slot[sl] != INT_MIN) evict(sl);
        stage(k, g, s, r, W, PAD, K.data() + sl * row);
        stage(v, g, s, r, W, PAD, V.data() + sl * row);
        probe += probe_row(V.data() + sl * row, W, g.D, PAD, s.ny);
        if (backward) probe += probe_row(K.data() + sl * row, W, g.D, PAD, s.ny);
        slot[sl] = r;
      }
    }
  };

  // The np (1 or 2) query rows i0, i0 + 1 of a step: their window starts and the window rows each
  // takes (mask mode leaves off-map rows out).
  struct Rows {
    int np, wsi[kPair], nu[kPair];
    const int* us[kPair];
    int nk;  // the key rows of the union of the windows that either query row takes
    const KeyRow* keys;
  };

  template <typename T>
  DCAL_AI static Rows rows_of(Work<T>& w, const Geo& g, const Slice& s, int i0, int np) {
    Rows q;
    q.np = np;
    for (int p = 0; p < np; ++p) {
      q.wsi[p] = window_start(i0 + p, s.nx, g.ks, g.border);
      int* us = w.us.data() + p * g.ks;
      q.nu[p] = 0;
      for (int u = 0; u < g.ks; ++u) {
        const int r = q.wsi[p] + u;
        if (g.border != kMask || (r >= 0 && r < s.nx)) us[q.nu[p]++] = u;
      }
      q.us[p] = us;
    }
    q.nk = 0;
    KeyRow* keys = w.keys.data();
    for (int r = q.wsi[0]; r < q.wsi[np - 1] + g.ks; ++r) {
      int u[kPair] = {-1, -1};
      for (int p = 0; p < np; ++p)
        if (std::find(q.us[p], q.us[p] + q.nu[p], r - q.wsi[p]) != q.us[p] + q.nu[p]) u[p] = r - q.wsi[p];
      if (u[0] >= 0 || u[1] >= 0) keys[q.nk++] = {r, u[0], u[1]};
    }
    q.keys = keys;
    return q;
  }

  // out_p[b][u][c] = sum_d A_p[d][b*L:] * B_r[d][b*L + cmin_b + c:] for the rows' lane blocks b and
  // window rows u (key row r = wsi_p + u); a key row in both windows is read once for both, and
  // stays in cache across the blocks. B_r: krow or vrow of the ring (member pointer).
  template <typename T>
  DCAL_AI static void pair_logits(Work<T>& w, const Rows& q, int ks, int nbr, int64_t D, const T* A0, const T* A1,
                                  const T* (Work<T>::*B)(int) const, vec_t<T>* out0, vec_t<T>* out1) {
    constexpr int L = Vec<T>::L;
    const int NC = 2 * ks - 1, PAD = w.PAD;
    for (int b = 0; b < nbr; ++b) {  // lane block outer: its query vectors stay in L1 over the key rows
      for (int t = 0; t < q.nk; ++t) {
        const int u0 = q.keys[t].u0, u1 = q.keys[t].u1;
        const bool in0 = u0 >= 0, in1 = u1 >= 0;
        const T* br = (w.*B)(q.keys[t].r);
        const T* kb = br + b * L + w.cmin[b];
        const int64_t base = int64_t{b} * ks;
        if (in0 && in1)
          dots2(A0 + PAD + b * L, A1 + PAD + b * L, kb, w.W, D, w.nc[b], out0 + (base + u0) * NC,
                out1 + (base + u1) * NC);
        else if (in0)
          dots(A0 + PAD + b * L, kb, w.W, D, w.nc[b], out0 + (base + u0) * NC);
        else
          dots(A1 + PAD + b * L, kb, w.W, D, w.nc[b], out1 + (base + u1) * NC);
      }
    }
  }

  // Lane block b, head dims d0 .. d0 + DB - 1 of o_p[b] (see pair_wsum): the accumulators stay in
  // registers over every key row and column offset of the pair's windows; a shifted value vector
  // loaded once serves both query rows where a key row is in both windows.
  template <typename T, int DB>
  DCAL_AI static void wsum_block(const Work<T>& w, const Rows& q, int ks, int b, int64_t d0, const vec_t<T>* wts0,
                                 const vec_t<T>* wts1, const T* (Work<T>::*B)(int) const, vec_t<T>* o0, vec_t<T>* o1) {
    constexpr int L = Vec<T>::L;
    const int NC = 2 * ks - 1, n = w.nc[b];
    const int64_t W = w.W, base = int64_t{b} * ks;
    vec_t<T> acc0[DB], acc1[DB];
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) acc0[e] = acc1[e] = vec_t<T>{};
    for (int t = 0; t < q.nk; ++t) {
      const int u0 = q.keys[t].u0, u1 = q.keys[t].u1;
      const T* vb = (w.*B)(q.keys[t].r) + b * L + w.cmin[b] + d0 * W;
      if (u0 >= 0 && u1 >= 0) {
        const vec_t<T>*x0 = wts0 + (base + u0) * NC, *x1 = wts1 + (base + u1) * NC;
        for (int c = 0; c < n; ++c) {
#pragma GCC unroll 16
          for (int e = 0; e < DB; ++e) {
            const vec_t<T> y = loadu(vb + c + e * W);
            acc0[e] += x0[c] * y;
            acc1[e] += x1[c] * y;
          }
        }
      } else {
        const vec_t<T>* x = u0 >= 0 ? wts0 + (base + u0) * NC : wts1 + (base + u1) * NC;
        vec_t<T>* acc = u0 >= 0 ? acc0 : acc1;
        for (int c = 0; c < n; ++c) {
#pragma GCC unroll 16
          for (int e = 0; e < DB; ++e) acc[e] += x[c] * loadu(vb + c + e * W);
        }
      }
    }
#pragma GCC unroll 16
    for (int e = 0; e < DB; ++e) {
      o0[d0 + e] = acc0[e];
      o1[d0 + e] = acc1[e];
    }
  }

  // o_p[b][d] = sum_{u, c} wts_p[b][u][c] * B_r[d][b*L + cmin_b + c:] (P @ V, dS @ K) for the rows'
  // lane blocks: per lane block, blocks of head dims accumulated in registers over all key rows.
  template <typename T>
  DCAL_AI static void pair_wsum(Work<T>& w, const Rows& q, int ks, int nbr, int64_t D, const vec_t<T>* wts0,
                                const vec_t<T>* wts1, const T* (Work<T>::*B)(int) const) {
    constexpr int kDB = VB == 64 ? 8 : 4;  // 2 * kDB accumulators: 16 of the 32 AVX-512 registers
    vec_t<T>* o0 = w.o.data();
    vec_t<T>* o1 = w.o.data() + int64_t{w.nb} * D;
    for (int b = 0; b < nbr; ++b)
      for (int64_t d0 = 0; d0 < D; d0 += kDB)
        with_block<kDB>(D - d0, [&](auto k) DCAL_LAMBDA_AI {
          wsum_block<T, decltype(k)::value>(w, q, ks, b, d0, wts0, wts1, B, o0 + b * D, o1 + b * D);
        });
  }

  // ---------------------------------------------------------------------------------------------
  // Forward: query rows [ia, ib) of one slice, two at a time.

  template <typename T>
  DCAL_AI static void fwd_rows(const FwdArgs<T>& a, int64_t sl, int ia, int ib, Work<T>& w) {
    using V = vec_t<T>;
    constexpr int L = Vec<T>::L;
    const Geo& g = a.g;
    const Slice s = slice_of(g, sl);
    const int ks = g.ks, R = 2 * ks - 1, NC = 2 * ks - 1, nbr = (s.ny + L - 1) / L;
    const int64_t D = g.D, sblk = int64_t{w.nb} * ks * NC;
    const T* bias = a.rpb ? a.rpb + (s.bh % g.H) * R * R : nullptr;
    const V ninf = splat(-std::numeric_limits<T>::infinity());
    std::fill(w.slot.begin(), w.slot.end(), INT_MIN);
    w.windows(g, s);
    for (int i0 = ia; i0 < ib; i0 += kPair) {
      const Rows q = rows_of(w, g, s, i0, std::min(kPair, ib - i0));
      w.stage_rows(g, s, a.k, a.v, q.wsi[0], q.wsi[q.np - 1] + ks, [](int) {});
      for (int p = 0; p < q.np; ++p) stage(a.q, g, s, i0 + p, w.W, w.PAD, w.Qt.data() + p * w.row);
      V* S = w.S.data();
      pair_logits(w, q, ks, nbr, D, w.Qt.data(), w.Qt.data() + w.row, &Work<T>::krow, S, S + sblk);
      for (int p = 0; p < q.np; ++p) {
        const int i = i0 + p, wsi = q.wsi[p];
        T* lse = a.lse + s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * i) * g.Y + s.gy;
        for (int b = 0; b < nbr; ++b) {  // softmax of each lane: P, normalised, in place of S
          const int cmin = w.cmin[b], nc = w.nc[b];
          const mask_t<T>* valid = w.valid.data() + b * NC;
          V* Sb = S + p * sblk + int64_t{b} * ks * NC;
          V m = ninf;
          for (int t = 0; t < q.nu[p]; ++t) {
            const int u = q.us[p][t];
            const T* br = bias ? bias + (wsi + u - i + ks - 1) * R + (cmin + ks - 1) : nullptr;
            V* su = Sb + u * NC;
            for (int c = 0; c < nc; ++c) {
              V x = su[c] * a.scale;
              if (br) x += br[c];
              x = valid[c] ? x : ninf;
              su[c] = x;
              m = vmax<T>(m, x);
            }
          }
          V l{};
          for (int t = 0; t < q.nu[p]; ++t) {
            V* su = Sb + q.us[p][t] * NC;
            for (int c = 0; c < nc; ++c) {
              const V e = valid[c] ? vexp(su[c] - m) : V{};
              l += e;
              su[c] = e;
            }
          }
          const V inv = splat(T(1)) / l;  // lanes past the row: 1 / 0, never stored
          for (int t = 0; t < q.nu[p]; ++t) {
            V* su = Sb + q.us[p][t] * NC;
            for (int c = 0; c < nc; ++c) su[c] *= inv;
          }
          const int nl = std::min(L, s.ny - b * L);
          for (int ln = 0; ln < nl; ++ln) lse[int64_t{b * L + ln} * g.dil] = m[ln] + std::log(l[ln]);
        }
      }
      pair_wsum(w, q, ks, nbr, D, S, S + sblk, &Work<T>::vrow);
      for (int p = 0; p < q.np; ++p)
        for (int b = 0; b < nbr; ++b)
          store_lanes(w.o.data() + (int64_t{p} * w.nb + b) * D, std::min(L, s.ny - b * L), g, s, i0 + p, b * L, a.out);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Backward: one whole slice, query rows two at a time.

  template <typename T>
  DCAL_AI static void bwd_slice(const BwdArgs<T>& a, int64_t sl, Work<T>& w) {
    using V = vec_t<T>;
    constexpr int L = Vec<T>::L;
    const Geo& g = a.g;
    const Slice s = slice_of(g, sl);
    const int ks = g.ks, R = 2 * ks - 1, NC = 2 * ks - 1, PAD = w.PAD, nbr = (s.ny + L - 1) / L;
    const int64_t W = w.W, D = g.D, row = w.row, sblk = int64_t{w.nb} * ks * NC;
    const T* bias = a.rpb ? a.rpb + (s.bh % g.H) * R * R : nullptr;
    std::fill(w.slot.begin(), w.slot.end(), INT_MIN);
    std::fill(w.bias.begin(), w.bias.end(), V{});
    std::fill(w.delta.begin(), w.delta.end(), T(0));
    std::fill(w.lse.begin(), w.lse.end(), T(0));
    w.windows(g, s);
    auto flush = [&](int sl_) DCAL_LAMBDA_AI {  // a key row leaves the ring: its dK, dV are complete
      const int r = w.slot[sl_];
      if (r >= 0 && r < s.nx) {  // an off-map row of zero mode: its gradients are dropped
        unstage(w.dK.data() + sl_ * row, g, s, r, W, PAD, a.dk);
        unstage(w.dV.data() + sl_ * row, g, s, r, W, PAD, a.dv);
      }
    };
    for (int i0 = 0; i0 < s.nx; i0 += kPair) {
      const Rows q = rows_of(w, g, s, i0, std::min(kPair, s.nx - i0));
      const int lo = q.wsi[0], hi = q.wsi[q.np - 1] + ks;
      for (int r = lo; r < hi; ++r) {  // key rows entering the ring: zeroed accumulators
        const int sl_ = w.slot_of(r);
        if (w.slot[sl_] == r) continue;
        if (w.slot[sl_] != INT_MIN) flush(sl_);
        w.slot[sl_] = INT_MIN;
        std::fill(w.dK.data() + sl_ * row, w.dK.data() + (sl_ + 1) * row, T(0));
        std::fill(w.dV.data() + sl_ * row, w.dV.data() + (sl_ + 1) * row, T(0));
      }
      w.stage_rows(g, s, a.k, a.v, lo, hi, [](int) {});
      for (int p = 0; p < q.np; ++p) {
        stage(a.q, g, s, i0 + p, W, PAD, w.Qt.data() + p * row);
        stage(a.dout, g, s, i0 + p, W, PAD, w.dOt.data() + p * row);
        w.probe +=
            probe_row(w.Qt.data() + p * row, W, D, PAD, s.ny) + probe_row(w.dOt.data() + p * row, W, D, PAD, s.ny);
      }
      V* S = w.S.data();
      V* dP = w.dP.data();
      pair_logits(w, q, ks, nbr, D, w.Qt.data(), w.Qt.data() + row, &Work<T>::krow, S, S + sblk);
      pair_logits(w, q, ks, nbr, D, w.dOt.data(), w.dOt.data() + row, &Work<T>::vrow, dP, dP + sblk);
      const int64_t prow_n = int64_t{ks} * w.NCR * W;  // one query row's P (or dS) rows
      std::fill(w.P.begin(), w.P.end(), T(0));
      std::fill(w.dS.begin(), w.dS.end(), T(0));
      for (int p = 0; p < q.np; ++p) {
        const int i = i0 + p, wsi = q.wsi[p];
        {  // delta = rowsum(dO * O) and the logsumexp, per query column
          const T* od = a.out.p + offset(a.out, g, s, i, 0);
          const T* dd = a.dout.p + offset(a.dout, g, s, i, 0);
          const int64_t co = int64_t{g.dil} * a.out.sy, cd = int64_t{g.dil} * a.dout.sy;
          const T* lr = a.lse + s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * i) * g.Y + s.gy;
          for (int j = 0; j < s.ny; ++j) w.lse[PAD + j] = lr[int64_t{j} * g.dil];
          T* dl = w.delta.data() + PAD;
          if (a.out.sd == 1 && a.dout.sd == 1) {  // token-major: one contiguous dot per query
            for (int j = 0; j < s.ny; ++j) dl[j] = cpu::dot_impl(dd + j * cd, od + j * co, D);
          } else {  // head-dim-major (channels-first): sweep the map row once per head dim, dO staged
            std::fill(dl, dl + s.ny, T(0));
            const T* dos = w.dOt.data() + p * row + PAD;
            for (int64_t d = 0; d < D; ++d) {
              const T* a_ = dos + d * W;
              const T* b_ = od + d * a.out.sd;
              if (co == 1) {  // contiguous: the loop vectorises
                for (int j = 0; j < s.ny; ++j) dl[j] += a_[j] * b_[j];
              } else {
                for (int j = 0; j < s.ny; ++j) dl[j] += a_[j] * b_[j * co];
              }
            }
          }
          T dprobe = 0;  // an inf or a NaN of out (or of dout) makes its query's delta non-finite
          for (int j = 0; j < s.ny; ++j) dprobe += dl[j] - dl[j];
          w.probe += dprobe;
        }
        for (int b = 0; b < nbr; ++b) {  // P and scale * dS, kept as rows for dK, dV; dS in place of S
          const int j0 = b * L, cmin = w.cmin[b], nc = w.nc[b];
          const mask_t<T>* valid = w.valid.data() + b * NC;
          const V lsev = loadu(w.lse.data() + PAD + j0), dlv = loadu(w.delta.data() + PAD + j0);
          for (int t = 0; t < q.nu[p]; ++t) {
            const int u = q.us[p][t];
            const int bi = wsi + u - i + ks - 1;
            const T* br = bias ? bias + bi * R + (cmin + ks - 1) : nullptr;
            V* su = S + p * sblk + (int64_t{b} * ks + u) * NC;
            const V* pu = dP + p * sblk + (int64_t{b} * ks + u) * NC;
            const int64_t ro = p * prow_n + (int64_t{u} * w.NCR + cmin + w.coff) * W + PAD + j0;
            T* prow = w.P.data() + ro;
            T* srow = w.dS.data() + ro;
            for (int c = 0; c < nc; ++c) {
              V x = su[c] * a.scale;
              if (br) x += br[c];
              const V pr = valid[c] ? vexp(x - lsev) : V{};
              const V ds = valid[c] ? pr * (pu[c] - dlv) : V{};
              if (bias) w.bias[bi * R + cmin + c + ks - 1] += ds;
              const V dss = ds * a.scale;
              storeu(prow + c * W, pr);
              storeu(srow + c * W, dss);
              su[c] = dss;
            }
          }
        }
      }
      // dK, dV of the pair's key rows, keys in the lanes, from both query rows in one pass (rows
      // off the map are dropped; a row outside one query row's window has zero P and dS there).
      for (int r = std::max(lo, 0); r < std::min(hi, s.nx); ++r) {
        const int64_t ko = w.slot_of(r) * row;
        for (int k0 = 0; k0 < s.ny; k0 += L) {
          const int clo = w.klo[k0 / L], chi = w.khi[k0 / L];
          for (int which = 0; which < 2; ++which) {  // dK from dS and Q, dV from P and dO
            const T* src = which == 0 ? w.dS.data() : w.P.data();
            const T* rows = which == 0 ? w.Qt.data() : w.dOt.data();
            int n = 0;
            for (int p = 0; p < q.np; ++p) {
              const int u = r - q.wsi[p];
              if (u < 0 || u >= ks) continue;
              for (int c = clo; c <= chi; ++c, ++n) {
                w.wp[n] = src + p * prow_n + (int64_t{u} * w.NCR + c + w.coff) * W + PAD + k0 - c;
                w.bp[n] = rows + p * row + PAD + k0 - c;
              }
            }
            gather(n, w.wp.data(), w.bp.data(), W, D, (which == 0 ? w.dK.data() : w.dV.data()) + ko + PAD + k0);
          }
        }
      }
      pair_wsum(w, q, ks, nbr, D, S, S + sblk, &Work<T>::krow);  // dQ = scale * dS @ K
      for (int p = 0; p < q.np; ++p)
        for (int b = 0; b < nbr; ++b)
          store_lanes(w.o.data() + (int64_t{p} * w.nb + b) * D, std::min(L, s.ny - b * L), g, s, i0 + p, b * L, a.dq);
    }
    for (int sl_ = 0; sl_ < w.RK; ++sl_)
      if (w.slot[sl_] != INT_MIN) flush(sl_);
    if (a.bias_part) {
      T* bp = a.bias_part + sl * R * R;
      for (int e = 0; e < R * R; ++e) {
        T acc = 0;
        for (int l = 0; l < L; ++l) acc += w.bias[e][l];
        bp[e] = acc;
      }
    }
  }
};  // struct Kern

// The loops of a task at one vector width (always inline: compiled inside the entry below).
template <int VB, typename T>
DCAL_AI void fwd_run(const FwdArgs<T>& a, int64_t b, int64_t e) {
  using K = Kern<VB>;
  typename K::template Work<T> w(a.g, false);
  const int64_t bands = (na2d::subgrid_len(0, static_cast<int>(a.g.X), a.g.dil) + a.band - 1) / a.band;
  for (int64_t t = b; t < e; ++t) {
    const typename K::Slice s = K::slice_of(a.g, t / bands);
    const int ia = static_cast<int>(t % bands) * a.band;
    if (ia < s.nx) K::fwd_rows(a, t / bands, ia, std::min(ia + a.band, s.nx), w);
  }
  if (!K::template finite<T>(w.probe)) a.nonfinite->store(true, std::memory_order_relaxed);
}
template <int VB, typename T>
DCAL_AI void bwd_run(const BwdArgs<T>& a, int64_t b, int64_t e) {
  using K = Kern<VB>;
  typename K::template Work<T> w(a.g, true);
  for (int64_t sl = b; sl < e; ++sl) K::bwd_slice(a, sl, w);
  if (!K::template finite<T>(w.probe)) a.nonfinite->store(true, std::memory_order_relaxed);
}

// The clone boundary: one non-template entry per type, compiled for each x86-64 level with
// 32-byte vectors, and on x86-64 an x86-64-v4 entry with 64-byte vectors (picked at run time when
// the CPU has AVX-512: use_avx512).
DCAL_CPU_CLONES void fwd_tasks(const FwdArgs<float>& a, int64_t b, int64_t e) { fwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void fwd_tasks(const FwdArgs<double>& a, int64_t b, int64_t e) { fwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void bwd_tasks(const BwdArgs<float>& a, int64_t b, int64_t e) { bwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void bwd_tasks(const BwdArgs<double>& a, int64_t b, int64_t e) { bwd_run<32>(a, b, e); }

#if defined(__x86_64__)
#define DCAL_V4 __attribute__((target("arch=x86-64-v4")))
DCAL_V4 void fwd_tasks_512(const FwdArgs<float>& a, int64_t b, int64_t e) { fwd_run<64>(a, b, e); }
DCAL_V4 void fwd_tasks_512(const FwdArgs<double>& a, int64_t b, int64_t e) { fwd_run<64>(a, b, e); }
DCAL_V4 void bwd_tasks_512(const BwdArgs<float>& a, int64_t b, int64_t e) { bwd_run<64>(a, b, e); }
DCAL_V4 void bwd_tasks_512(const BwdArgs<double>& a, int64_t b, int64_t e) { bwd_run<64>(a, b, e); }

// The 64-byte kernels run when the CPU has the x86-64-v4 set (AVX-512 F, BW, DQ, VL) and
// DCAL_CPU_VECTOR_BITS is not 256 (that setting runs the 32-byte kernels, for comparison and for
// the tests of both widths on one machine).
bool use_avx512() {
  static const bool on = [] {
    const char* env = std::getenv("DCAL_CPU_VECTOR_BITS");
    if (env != nullptr && std::strcmp(env, "256") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return on;
}
template <typename A>
void fwd_dispatch(const A& a, int64_t b, int64_t e) {
  if (use_avx512())
    fwd_tasks_512(a, b, e);
  else
    fwd_tasks(a, b, e);
}
template <typename A>
void bwd_dispatch(const A& a, int64_t b, int64_t e) {
  if (use_avx512())
    bwd_tasks_512(a, b, e);
  else
    bwd_tasks(a, b, e);
}
#else
template <typename A>
void fwd_dispatch(const A& a, int64_t b, int64_t e) {
  fwd_tasks(a, b, e);
}
template <typename A>
void bwd_dispatch(const A& a, int64_t b, int64_t e) {
  bwd_tasks(a, b, e);
}
#endif

// Query rows per forward task: a band restages ks - 1 key rows beyond its own, so bands are long,
// but there are at least a few tasks per thread for the balance.
int band_rows(const Geo& g) {
  const int64_t nx = na2d::subgrid_len(0, static_cast<int>(g.X), g.dil);
  const int64_t slices = g.B * g.H * g.dil * g.dil, want = 4 * at::get_num_threads();
  int64_t band = nx;
  while (band > 2 * g.ks && slices * ((nx + band - 1) / band) < want) band = (band + 1) / 2;
  return static_cast<int>(band);
}

template <typename T>
bool fwd_impl(const Geo& g, In<T> q, In<T> k, In<T> v, const T* rpb, Out<T> out, T* lse, T scale) {
  std::atomic<bool> nonfinite{false};
  const FwdArgs<T> a{g, q, k, v, rpb, out, lse, scale, band_rows(g), &nonfinite};
  const int64_t bands = (na2d::subgrid_len(0, static_cast<int>(g.X), g.dil) + a.band - 1) / a.band;
  at::parallel_for(0, g.B * g.H * g.dil * g.dil * bands, 1, [&](int64_t b, int64_t e) { fwd_dispatch(a, b, e); });
  return !nonfinite.load();
}

template <typename T>
bool bwd_impl(const Geo& g, In<T> dout, In<T> q, In<T> k, In<T> v, const T* rpb, In<T> out, const T* lse, Out<T> dq,
              Out<T> dk, Out<T> dv, T* bias_part, T scale) {
  std::atomic<bool> nonfinite{false};
  const BwdArgs<T> a{g, dout, q, k, v, out, rpb, lse, dq, dk, dv, bias_part, scale, &nonfinite};
  at::parallel_for(0, g.B * g.H * g.dil * g.dil, 1, [&](int64_t b, int64_t e) { bwd_dispatch(a, b, e); });
  return !nonfinite.load();
}

}  // namespace

bool fwd(const Geo& g, In<float> q, In<float> k, In<float> v, const float* rpb, Out<float> out, float* lse,
         float scale) {
  return fwd_impl(g, q, k, v, rpb, out, lse, scale);
}
bool fwd(const Geo& g, In<double> q, In<double> k, In<double> v, const double* rpb, Out<double> out, double* lse,
         double scale) {
  return fwd_impl(g, q, k, v, rpb, out, lse, scale);
}
bool bwd(const Geo& g, In<float> dout, In<float> q, In<float> k, In<float> v, const float* rpb, In<float> out,
         const float* lse, Out<float> dq, Out<float> dk, Out<float> dv, float* bias_part, float scale) {
  return bwd_impl(g, dout, q, k, v, rpb, out, lse, dq, dk, dv, bias_part, scale);
}
bool bwd(const Geo& g, In<double> dout, In<double> q, In<double> k, In<double> v, const double* rpb, In<double> out,
         const double* lse, Out<double> dq, Out<double> dk, Out<double> dv, double* bias_part, double scale) {
  return bwd_impl(g, dout, q, k, v, rpb, out, lse, dq, dk, dv, bias_part, scale);
}

}  // namespace na2d_simd
}  // namespace dcal
