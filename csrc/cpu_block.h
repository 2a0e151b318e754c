// Block products and row loops of the CPU attention kernels that walk whole score tiles
// (mkv_cpu.cpp, rollout_cpu.cpp).
//
// Products: `mm` is the row-major C[M, N] (+)= A[M, K] @ B[K, N] with no transposition and no
// scalar factor. fp32 runs on oneDNN's batch-reduce GEMM micro-kernel as libtorch exports it
// (at::native::cpublas::brgemm: JIT code for the CPU it runs on, B read in place with any row
// stride, so nothing is packed per call), or MKL's sgemm where that entry point is absent; fp64
// runs on dgemm. The kernels arrange their operands so every product has this form: keys (and
// values for dP) transposed once per head, dK/dV accumulated transposed, the softmax scale folded
// into the exponent instead of a GEMM's alpha.
//
// Row loops: explicit GCC vector types (64 bytes: 16 floats / 8 doubles), so the max, exp and
// sum loops are SIMD in every clone (with -O3 alone GCC leaves a select-based max scalar), and
// the reductions keep lane partials combined in a fixed order: the same bits on every clone and
// whatever the thread count.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"

namespace dcal {
namespace cpu {

#if defined(CPUBLAS_BRGEMM_F32F32F32)
constexpr bool kHasBrgemm = true;
#else
constexpr bool kHasBrgemm = false;
#endif

// Row-major C[M, N] = A[M, K] @ B[K, N] (+ C when add). Leading dimensions are row strides.
inline void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool add) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
#else
  gemm('N', 'N', static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0f, A, static_cast<int>(lda), B,
       static_cast<int>(ldb), add ? 1.0f : 0.0f, C, static_cast<int>(ldc));
#endif
}
inline void mm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
               int64_t ldc, bool add) {
  gemm('N', 'N', static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0, A, static_cast<int>(lda), B,
       static_cast<int>(ldb), add ? 1.0 : 0.0, C, static_cast<int>(ldc));
}

// dst[d * ldd + i] = src[i * lds + d] for i < n, d < D (any source type: bf16 widens here).
template <typename S, typename T>
inline void transpose(const S* src, int64_t lds, int64_t n, int64_t D, T* dst, int64_t ldd) {
  constexpr int64_t kRows = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    const int64_t i1 = std::min(n, i0 + kRows);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t i = i0; i < i1; ++i) dst[d * ldd + i] = static_cast<T>(src[i * lds + d]);
  }
}

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
  [[gnu::always_inline]] static V exp(V x) { return exp_poly_f32<V, I>(x); }
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int W = 8;
  [[gnu::always_inline]] static V exp(V x) { return exp_poly_f64<V, I>(x); }
};

template <typename V, typename T>
[[gnu::always_inline]] inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
[[gnu::always_inline]] inline void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename T, typename V>
[[gnu::always_inline]] inline T hsum(V v) {  // fixed order
  constexpr int W = sizeof(V) / sizeof(T);
  T s = 0;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// max_j s[j] (min_j when lowest: the maximum of scale * s for a negative scale). NaNs are
// skipped like std::max skips a NaN second argument.
template <typename T>
[[gnu::always_inline]] inline T row_extreme_vec(const T* s, int64_t n, bool lowest) {
  using S = Simd<T>;
  using V = typename S::V;
  const T inf = std::numeric_limits<T>::infinity();
  int64_t j = 0;
  T m = lowest ? inf : -inf;
  if (!lowest) {
    V acc = V{} - inf;
    for (; j + S::W <= n; j += S::W) {
      const V x = vload<V>(s + j);
      acc = acc < x ? x : acc;
    }
    for (int l = 0; l < S::W; ++l) m = std::max(m, acc[l]);
    for (; j < n; ++j) m = std::max(m, s[j]);
  } else {
    V acc = V{} + inf;
    for (; j + S::W <= n; j += S::W) {
      const V x = vload<V>(s + j);
      acc = x < acc ? x : acc;
    }
    for (int l = 0; l < S::W; ++l) m = std::min(m, acc[l]);
    for (; j < n; ++j) m = std::min(m, s[j]);
  }
  return m;
}

// s <- exp(a * s - c); returns the row sum (lane partials, fixed order)
template <typename T>
[[gnu::always_inline]] inline T exp_scale_sum_vec(T* s, int64_t n, T a, T c) {
  using S = Simd<T>;
  using V = typename S::V;
  V acc = V{};
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) {
    const V e = S::exp(vload<V>(s + j) * a - c);
    vstore(s + j, e);
    acc += e;
  }
  T sum = hsum<T>(acc);
  for (; j < n; ++j) {
    s[j] = exp_poly(s[j] * a - c);
    sum += s[j];
  }
  return sum;
}

// s <- exp(a * s - c)
template <typename T>
[[gnu::always_inline]] inline void exp_scale_vec(T* s, int64_t n, T a, T c) {
  using S = Simd<T>;
  using V = typename S::V;
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) vstore(s + j, S::exp(vload<V>(s + j) * a - c));
  for (; j < n; ++j) s[j] = exp_poly(s[j] * a - c);
}

// acc <- acc + w * exp(a * s - c)
template <typename T>
[[gnu::always_inline]] inline void exp_scale_axpy_vec(T* acc, const T* s, int64_t n, T a, T c, T w) {
  using S = Simd<T>;
  using V = typename S::V;
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) vstore(acc + j, vload<V>(acc + j) + w * S::exp(vload<V>(s + j) * a - c));
  for (; j < n; ++j) acc[j] += w * exp_poly(s[j] * a - c);
}

// ds <- a * p * (ds - delta)
template <typename T>
[[gnu::always_inline]] inline void dsoftmax_vec(T* ds, const T* p, int64_t n, T delta, T a) {
  using S = Simd<T>;
  using V = typename S::V;
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) vstore(ds + j, a * vload<V>(p + j) * (vload<V>(ds + j) - delta));
  for (; j < n; ++j) ds[j] = a * p[j] * (ds[j] - delta);
}

// o <- o * c
template <typename T>
[[gnu::always_inline]] inline void scale_vec(T* o, int64_t n, T c) {
  using S = Simd<T>;
  using V = typename S::V;
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) vstore(o + j, vload<V>(o + j) * c);
  for (; j < n; ++j) o[j] *= c;
}

}  // namespace cpu
}  // namespace dcal
