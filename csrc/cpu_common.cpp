// The row loops of cpu_common.h: each one an x86-64-v4 / v3 / baseline clone set (DCAL_CPU_CLONES)
// of its always-inline body in cpu_block.h / cpu_math.h, so the extension runs the widest vectors
// the CPU has without -march flags.
#include "cpu_common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dcal {
namespace cpu {
namespace {

// acc <- acc + w * p
template <typename T>
[[gnu::always_inline]] inline void axpy_impl(T* acc, const T* p, int64_t n, T w) {
  for (int64_t j = 0; j < n; ++j) acc[j] += w * p[j];
}

#if defined(__x86_64__)
// The 16 x 16 tiles of transpose: 16 rows of src in, 16 rows of dst out (unpack, then 32-bit and
// 128-bit lane shuffles); the edges that do not fill a tile go through the scalar template.
__attribute__((target("avx512f"))) void transpose_avx512(const float* src, int64_t lds, int64_t n, int64_t D,
                                                         float* dst, int64_t ldd) {
  const int64_t n16 = n / 16 * 16, D16 = D / 16 * 16;
  for (int64_t i0 = 0; i0 < n16; i0 += 16) {
    for (int64_t d0 = 0; d0 < D16; d0 += 16) {
      __m512 r[16], t[16];
      for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_ps(src + (i0 + l) * lds + d0);
      for (int l = 0; l < 8; ++l) {
        t[2 * l] = _mm512_unpacklo_ps(r[2 * l], r[2 * l + 1]);
        t[2 * l + 1] = _mm512_unpackhi_ps(r[2 * l], r[2 * l + 1]);
      }
      for (int l = 0; l < 4; ++l) {
        r[4 * l] = _mm512_shuffle_ps(t[4 * l], t[4 * l + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * l + 1] = _mm512_shuffle_ps(t[4 * l], t[4 * l + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * l + 2] = _mm512_shuffle_ps(t[4 * l + 1], t[4 * l + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * l + 3] = _mm512_shuffle_ps(t[4 * l + 1], t[4 * l + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 4; ++l) {
          t[8 * h + l] = _mm512_shuffle_f32x4(r[8 * h + l], r[8 * h + l + 4], 0x88);
          t[8 * h + l + 4] = _mm512_shuffle_f32x4(r[8 * h + l], r[8 * h + l + 4], 0xdd);
        }
      for (int l = 0; l < 8; ++l) {
        r[l] = _mm512_shuffle_f32x4(t[l], t[l + 8], 0x88);
        r[l + 8] = _mm512_shuffle_f32x4(t[l], t[l + 8], 0xdd);
      }
      for (int l = 0; l < 16; ++l) _mm512_storeu_ps(dst + (d0 + l) * ldd + i0, r[l]);
    }
    if (D16 < D) transpose<float, float>(src + i0 * lds + D16, lds, 16, D - D16, dst + D16 * ldd + i0, ldd);
  }
  if (n16 < n) transpose<float, float>(src + n16 * lds, lds, n - n16, D, dst + n16, ldd);
}

// fp32 exp loops for AVX-512 CPUs: the loops of cpu_block.h with four vectors per step (four
// independent exp chains in flight) and exp's argument clamp on vmaxps/vminps. max(lo, x) and
// min(hi, x) return x for a NaN and otherwise select as exp_poly_f32's ternaries do, every element
// takes the same operations in the same order and the row sum the same additions in the same
// order: the results are the bits of the generic loops' x86-64-v4 clone, with two of about 21
// vector operations per 16 lanes saved.
using V16 = Simd<float>::V;
using I16 = Simd<float>::I;
[[gnu::always_inline]] __attribute__((target("arch=x86-64-v4"))) inline V16 exp_v4(V16 x) {
  using C = ExpConst<float>;
  const __m512 lo = _mm512_max_ps(_mm512_set1_ps(C::kLo), (__m512)x);
  return exp_poly_f32<V16, I16, false>((V16)_mm512_min_ps(_mm512_set1_ps(C::kHi), lo));
}
constexpr int kSteps = 4;  // vectors per step

__attribute__((target("arch=x86-64-v4"))) void exp_scale_v4(float* s, int64_t n, float a, float c) {
  constexpr int W = Simd<float>::W;
  int64_t j = 0;
  for (; j + kSteps * W <= n; j += kSteps * W) {
    V16 e[kSteps];
    for (int u = 0; u < kSteps; ++u) e[u] = exp_v4(vload<V16>(s + j + u * W) * a - c);
    for (int u = 0; u < kSteps; ++u) vstore(s + j + u * W, e[u]);
  }
  for (; j + W <= n; j += W) vstore(s + j, exp_v4(vload<V16>(s + j) * a - c));
  for (; j < n; ++j) s[j] = exp_poly(s[j] * a - c);
}

// exp(a * s - c) in place over row s and its sum (exp_scale_sum_vec's bits) and, with kNext, the
// extreme (row_extreme) of the next row t of the tile in the same loop: t streams in from L2 while the exponentials
// keep the vector units busy, instead of a separate pass. vmaxps(x, acc) / vminps(x, acc) select as row_extreme_vec's
// ternaries do (a NaN x is skipped, a tie keeps acc), lane by lane over the same vectors in the same order, and the
// lanes and the tail are folded as there: the same bits as the two separate loops.
template <bool kLowest>
[[gnu::always_inline]] __attribute__((target("arch=x86-64-v4"))) inline __m512 fold_extreme(__m512 x, __m512 m) {
  if constexpr (kLowest)
    return _mm512_min_ps(x, m);
  else
    return _mm512_max_ps(x, m);
}

template <bool kNext, bool kLowest>
[[gnu::always_inline]] __attribute__((target("arch=x86-64-v4"))) inline float exp_scale_sum_v4_impl(float* s, int64_t n,
                                                                                                    float a, float c,
                                                                                                    const float* t,
                                                                                                    float* extreme) {
  constexpr int W = Simd<float>::W;
  const float inf = std::numeric_limits<float>::infinity();
  V16 acc = V16{};
  __m512 mx = _mm512_set1_ps(kLowest ? inf : -inf);
  int64_t j = 0;
  for (; j + kSteps * W <= n; j += kSteps * W) {
    V16 e[kSteps];
    for (int u = 0; u < kSteps; ++u) e[u] = exp_v4(vload<V16>(s + j + u * W) * a - c);
    for (int u = 0; u < kSteps; ++u) {
      vstore(s + j + u * W, e[u]);
      acc += e[u];
    }
    if constexpr (kNext)
      for (int u = 0; u < kSteps; ++u) mx = fold_extreme<kLowest>(_mm512_loadu_ps(t + j + u * W), mx);
  }
  for (; j + W <= n; j += W) {
    const V16 e = exp_v4(vload<V16>(s + j) * a - c);
    vstore(s + j, e);
    acc += e;
    if constexpr (kNext) mx = fold_extreme<kLowest>(_mm512_loadu_ps(t + j), mx);
  }
  float sum = hsum<float>(acc);
  for (int64_t k = j; k < n; ++k) {
    s[k] = exp_poly(s[k] * a - c);
    sum += s[k];
  }
  if constexpr (!kNext) return sum;
  alignas(64) float lanes[W];
  _mm512_store_ps(lanes, mx);
  float m = kLowest ? inf : -inf;
  for (int l = 0; l < W; ++l) m = kLowest ? std::min(m, lanes[l]) : std::max(m, lanes[l]);
  for (int64_t k = j; k < n; ++k) m = kLowest ? std::min(m, t[k]) : std::max(m, t[k]);
  *extreme = m;
  return sum;
}

__attribute__((target("arch=x86-64-v4"))) float exp_scale_sum_extreme_v4(float* s, int64_t n, float a, float c,
                                                                         const float* t, bool lowest, float* extreme) {
  return lowest ? exp_scale_sum_v4_impl<true, true>(s, n, a, c, t, extreme)
                : exp_scale_sum_v4_impl<true, false>(s, n, a, c, t, extreme);
}

__attribute__((target("arch=x86-64-v4"))) float exp_scale_sum_v4(float* s, int64_t n, float a, float c) {
  return exp_scale_sum_v4_impl<false, false>(s, n, a, c, nullptr, nullptr);
}

// The backward's two row passes in one: p <- exp(a * p - c) (exp_scale_v4), then
// ds <- a * p * (ds - delta) (dsoftmax) with the new p still in registers: the same operations
// per element in the same order as the two loops.
__attribute__((target("arch=x86-64-v4"))) void exp_scale_dsoftmax_v4(float* p, float* ds, int64_t n, float a, float c,
                                                                     float delta) {
  constexpr int W = Simd<float>::W;
  int64_t j = 0;
  for (; j + kSteps * W <= n; j += kSteps * W) {
    V16 e[kSteps];
    for (int u = 0; u < kSteps; ++u) e[u] = exp_v4(vload<V16>(p + j + u * W) * a - c);
    for (int u = 0; u < kSteps; ++u) {
      vstore(p + j + u * W, e[u]);
      vstore(ds + j + u * W, a * e[u] * (vload<V16>(ds + j + u * W) - delta));
    }
  }
  for (; j + W <= n; j += W) {
    const V16 e = exp_v4(vload<V16>(p + j) * a - c);
    vstore(p + j, e);
    vstore(ds + j, a * e * (vload<V16>(ds + j) - delta));
  }
  for (; j < n; ++j) {
    p[j] = exp_poly(p[j] * a - c);
    ds[j] = a * p[j] * (ds[j] - delta);
  }
}

bool has_v4() {
  static const bool v4 = __builtin_cpu_supports("x86-64-v4");
  return v4;
}
#endif

// the generic loops, one clone per x86-64 level
DCAL_CPU_CLONES float exp_scale_sum_any(float* s, int64_t n, float a, float c) { return exp_scale_sum_vec(s, n, a, c); }
DCAL_CPU_CLONES void exp_scale_any(float* s, int64_t n, float a, float c) { exp_scale_vec(s, n, a, c); }

}  // namespace

float exp_scale_sum(float* s, int64_t n, float a, float c) {
#if defined(__x86_64__)
  if (has_v4()) return exp_scale_sum_v4(s, n, a, c);
#endif
  return exp_scale_sum_any(s, n, a, c);
}
float exp_scale_sum_extreme(float* s, int64_t n, float a, float c, const float* t, bool lo, float* extreme) {
#if defined(__x86_64__)
  if (has_v4()) return exp_scale_sum_extreme_v4(s, n, a, c, t, lo, extreme);
#endif
  const float sum = exp_scale_sum_any(s, n, a, c);
  *extreme = row_extreme(t, n, lo);
  return sum;
}
double exp_scale_sum_extreme(double* s, int64_t n, double a, double c, const double* t, bool lo, double* extreme) {
  const double sum = exp_scale_sum(s, n, a, c);
  *extreme = row_extreme(t, n, lo);
  return sum;
}
void exp_scale_dsoftmax(float* p, float* ds, int64_t n, float a, float c, float delta) {
#if defined(__x86_64__)
  if (has_v4()) return exp_scale_dsoftmax_v4(p, ds, n, a, c, delta);
#endif
  exp_scale_any(p, n, a, c);
  dsoftmax(ds, p, n, delta, a);
}
void exp_scale_dsoftmax(double* p, double* ds, int64_t n, double a, double c, double delta) {
  exp_scale(p, n, a, c);
  dsoftmax(ds, p, n, delta, a);
}
void exp_scale(float* s, int64_t n, float a, float c) {
#if defined(__x86_64__)
  if (has_v4()) return exp_scale_v4(s, n, a, c);
#endif
  exp_scale_any(s, n, a, c);
}

void transpose(const float* src, int64_t lds, int64_t n, int64_t D, float* dst, int64_t ldd) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return transpose_avx512(src, lds, n, D, dst, ldd);
#endif
  transpose<float, float>(src, lds, n, D, dst, ldd);
}

DCAL_CPU_CLONES float row_extreme(const float* s, int64_t n, bool lo) { return row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES double row_extreme(const double* s, int64_t n, bool lo) { return row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES double exp_scale_sum(double* s, int64_t n, double a, double c) { return exp_scale_sum_vec(s, n, a, c); }
DCAL_CPU_CLONES void exp_scale(double* s, int64_t n, double a, double c) { exp_scale_vec(s, n, a, c); }
DCAL_CPU_CLONES void exp_scale_axpy(float* acc, const float* s, int64_t n, float a, float c, float w) {
  exp_scale_axpy_vec(acc, s, n, a, c, w);
}
DCAL_CPU_CLONES void exp_scale_axpy(double* acc, const double* s, int64_t n, double a, double c, double w) {
  exp_scale_axpy_vec(acc, s, n, a, c, w);
}
DCAL_CPU_CLONES void axpy(float* acc, const float* p, int64_t n, float w) { axpy_impl(acc, p, n, w); }
DCAL_CPU_CLONES void axpy(double* acc, const double* p, int64_t n, double w) { axpy_impl(acc, p, n, w); }
DCAL_CPU_CLONES void dsoftmax(float* ds, const float* p, int64_t n, float d, float a) { dsoftmax_vec(ds, p, n, d, a); }
DCAL_CPU_CLONES void dsoftmax(double* ds, const double* p, int64_t n, double d, double a) {
  dsoftmax_vec(ds, p, n, d, a);
}
DCAL_CPU_CLONES void scale_row(float* o, int64_t n, float c) { scale_vec(o, n, c); }
DCAL_CPU_CLONES void scale_row(double* o, int64_t n, double c) { scale_vec(o, n, c); }
DCAL_CPU_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
DCAL_CPU_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }

}  // namespace cpu
}  // namespace dcal
