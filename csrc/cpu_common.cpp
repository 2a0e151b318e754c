// The row loops of cpu_common.h: each one an x86-64-v4 / v3 / baseline clone set (DCAL_CPU_CLONES)
// of its always-inline body in cpu_block.h / cpu_math.h, so the extension runs the widest vectors
// the CPU has without -march flags.
#include "cpu_common.h"

namespace dcal {
namespace cpu {
namespace {

// acc <- acc + w * p
template <typename T>
[[gnu::always_inline]] inline void axpy_impl(T* acc, const T* p, int64_t n, T w) {
  for (int64_t j = 0; j < n; ++j) acc[j] += w * p[j];
}

}  // namespace

DCAL_CPU_CLONES float row_extreme(const float* s, int64_t n, bool lo) { return row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES double row_extreme(const double* s, int64_t n, bool lo) { return row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES float exp_scale_sum(float* s, int64_t n, float a, float c) { return exp_scale_sum_vec(s, n, a, c); }
DCAL_CPU_CLONES double exp_scale_sum(double* s, int64_t n, double a, double c) { return exp_scale_sum_vec(s, n, a, c); }
DCAL_CPU_CLONES void exp_scale(float* s, int64_t n, float a, float c) { exp_scale_vec(s, n, a, c); }
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
