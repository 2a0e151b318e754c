// Building blocks shared by the CPU attention kernels (mkv_cpu.cpp, rollout_cpu.cpp): row-major
// BLAS GEMM through the MKL that libtorch_cpu exports, and a polynomial exp and row loops that
// vectorise without fast-math flags.
//
// The element loops are written here as always-inline templates; each kernel file instantiates
// the ones it needs under DCAL_CPU_CLONES (x86-64-v4 / v3 / baseline clones picked at load time:
// the extension is built without -march flags).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// CPU-model clones such as "arch=skylake-avx512" would never match other vendors, hence the
// x86-64 micro-architecture levels.
#if defined(__x86_64__)
#define DCAL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCAL_CPU_CLONES
#endif

namespace dcal {
namespace cpu {

// Row-major C[M, N] = alpha op(A) op(B) + beta C. BLAS is column-major, where a row-major matrix
// reads as its transpose: C^T = op(B)^T op(A)^T, so the operands swap and the flags stay.
inline void gemm(char ta, char tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  sgemm_(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
inline void gemm(char ta, char tb, int M, int N, int K, double alpha, const double* A, int lda, const double* B,
                 int ldb, double beta, double* C, int ldc) {
  dgemm_(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// exp by Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a Taylor polynomial of r (degree
// 7 for fp32, 13 for fp64: truncation below half an ulp), so the element loops vectorise
// (std::exp does not without -ffast-math). Arguments are clamped at -87 (fp32) / -708 (fp64), so
// a weight below e^-87 (e^-708) counts as e^-87 (e^-708): far below the rounding of any sum that
// includes the row maximum's weight 1, and branch-free. Callers pass x <= 0 (scores minus the
// row maximum or the logsumexp); a larger argument (a logsumexp passed in that is too small) is
// clamped at 88 (709), a huge finite weight instead of a wrapped exponent field.
//
// One body for scalars and for GCC vector types (the SIMD kernels call it lane-wise with a vector
// of floats or doubles V and the integer vector I of the same shape): constants enter as V{} + c
// (exact), the ternaries select lane-wise, and the exponent's integer conversion is the scalar or
// the vector one.
template <typename I, typename V>
[[gnu::always_inline]] inline I exp_int(V n) {
  if constexpr (std::is_arithmetic_v<V>) {
    return static_cast<I>(n);
  } else {
    return __builtin_convertvector(n, I);
  }
}

// The constants of exp_poly, named once per precision: log2(e); ln(2) split into a high part
// with trailing zero bits (n * kLn2Hi is exact for the n that occur) and the rest; the
// round-to-nearest shifter 1.5 * 2^(mantissa bits); the clamps of the argument; the exponent
// bias and field position that build 2^n.
template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693145751953125f;
  static constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float kLo = -87.0f, kHi = 88.0f;
  static constexpr int kBias = 127, kMantissa = 23;  // of the exponent field 2^n
};
template <>
struct ExpConst<double> {
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLo = -708.0, kHi = 709.0;
  static constexpr int kBias = 1023, kMantissa = 52;
};

// kClamp false: the caller has clamped x to [kLo, kHi] itself, selecting as the two ternaries do
// (the AVX-512 row loops of cpu_common.cpp, with max/min instructions).
template <typename V, typename I, bool kClamp = true>  // V float or a vector of float; I int32_t of its shape
[[gnu::always_inline]] inline V exp_poly_f32(V x) {
  using C = ExpConst<float>;
  if constexpr (kClamp) {
    const V lo = V{} + C::kLo, hi = V{} + C::kHi;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
  }
  // round to nearest by the shifter (no floor call: it blocks vectorisation)
  const V n = (x * C::kLog2e + C::kShifter) - C::kShifter;
  V r = x - n * C::kLn2Hi;
  r = r - n * C::kLn2Lo;
  V p = V{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * __builtin_bit_cast(V, (exp_int<I>(n) + C::kBias) << C::kMantissa);
}

template <typename V, typename I>  // V double or a vector of double; I int64_t of its shape
[[gnu::always_inline]] inline V exp_poly_f64(V x) {
  using C = ExpConst<double>;
  const V lo = V{} + C::kLo, hi = V{} + C::kHi;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V n = (x * C::kLog2e + C::kShifter) - C::kShifter;
  V r = x - n * C::kLn2Hi;
  r = r - n * C::kLn2Lo;
  V p = V{} + 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  return p * __builtin_bit_cast(V, (exp_int<I>(n) + C::kBias) << C::kMantissa);
}

[[gnu::always_inline]] inline float exp_poly(float x) { return exp_poly_f32<float, int32_t>(x); }
[[gnu::always_inline]] inline double exp_poly(double x) { return exp_poly_f64<double, int64_t>(x); }

// The reductions keep kLanes partial results (combined in a fixed order), so they vectorise
// without reassociation flags and give the same bits on every clone.
constexpr int64_t kLanes = 16;

template <typename T>
[[gnu::always_inline]] inline T row_max_impl(const T* s, int64_t n) {
  T acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = acc[l] < s[j + l] ? s[j + l] : acc[l];
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, acc[l]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

template <typename T>
[[gnu::always_inline]] inline T sum_impl(const T* s, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += s[j + l];
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) sum += s[j];
  return sum;
}

template <typename T>
[[gnu::always_inline]] inline void exp_sub_impl(T* s, int64_t n, T c) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_poly(s[j] - c);
}

// s <- exp(s - c); returns the row sum (fused: one pass over the row)
template <typename T>
[[gnu::always_inline]] inline T exp_sub_sum_impl(T* s, int64_t n, T c) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const T e = exp_poly(s[j + l] - c);
      s[j + l] = e;
      acc[l] += e;
    }
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) {
    s[j] = exp_poly(s[j] - c);
    sum += s[j];
  }
  return sum;
}

template <typename T>
[[gnu::always_inline]] inline T dot_impl(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace cpu
}  // namespace dcal
