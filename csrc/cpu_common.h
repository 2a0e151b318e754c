// What the CPU attention hosts and kernels (mkv_cpu.cpp, rollout_cpu.cpp) share: how a
// [B, H, N, D] input is read in place, the tile geometry rules, and the row loops over score
// tiles, compiled once in cpu_common.cpp as x86-64-v4 / v3 / baseline clones (DCAL_CPU_CLONES,
// picked at load time) of the loops in cpu_block.h and cpu_math.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu_block.h"

namespace dcal {
namespace cpu {

// One [B, H, N, D] tensor with unit stride along D and a row stride >= D, read in place.
template <typename T>
struct HeadsView {
  const T* data;
  int64_t sb, sh, sn;
  const T* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

// t itself when the products can read it in place (unit stride along D, rows at least D apart:
// views of a fused qkv projection qualify); otherwise one contiguous copy. Call it after the
// argument checks (t is 4-D).
inline at::Tensor blas_ready(const at::Tensor& t) {
  const int64_t D = t.size(3);
  if (t.stride(3) == 1 && (t.stride(2) >= D || t.size(2) == 1)) return t;
  return t.contiguous();
}

// The view of a blas_ready tensor. A single-token axis may carry any stride; the products want a
// row stride >= D.
template <typename T>
HeadsView<T> view_of(const at::Tensor& t) {
  const int64_t sn = t.size(2) == 1 ? t.size(3) : t.stride(2);
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), sn};
}

// A per-thread work buffer (score tiles, transposed panels) of n zeroed elements starting on a
// cache line: std::vector's storage is only 16-byte aligned, so every 64-byte row access of a tile
// or panel (the products' loads and stores, the row loops) would span two lines.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) : size_((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64) {
    p_ = static_cast<T*>(std::aligned_alloc(64, size_));
    if (p_ == nullptr) throw std::bad_alloc();
    std::memset(static_cast<void*>(p_), 0, size_);
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }

 private:
  size_t size_;
  T* p_;
};

// n rounded up to 16 elements: the row stride of a score tile (64-byte fp32 rows).
inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// Row stride of a transposed [D, keys] panel: padded, and off multiples of 1 KiB, which would map
// every row of a column to the same cache sets.
inline int64_t panel_ld(int64_t keys) {
  const int64_t ld = padded(keys);
  return ld % 256 == 0 ? ld + 16 : ld;
}

// Rows per block when n rows are split into ceil(n / most) blocks of (nearly) equal size (785
// rows, at most 200 a block: 4 blocks of 197), so there is no short tail block.
inline int64_t block_rows(int64_t n, int64_t most) {
  const int64_t nb = (n + most - 1) / most;
  return (n + nb - 1) / nb;
}

// dst[d * ldd + i] = src[i * lds + d] for i < n, d < D: 16 x 16 tiles through AVX-512 registers
// where the CPU has them (the template in cpu_block.h elsewhere and for the edges). A copy: the
// same bits on every path.
void transpose(const float* src, int64_t lds, int64_t n, int64_t D, float* dst, int64_t ldd);

// Row loops (cpu_common.cpp), fp32 and fp64.
// max_j s[j], or min_j when lo (the maximum of scale * s for a negative scale)
float row_extreme(const float* s, int64_t n, bool lo);
double row_extreme(const double* s, int64_t n, bool lo);
// s <- exp(a * s - c); returns the row sum
float exp_scale_sum(float* s, int64_t n, float a, float c);
double exp_scale_sum(double* s, int64_t n, double a, double c);
// exp_scale_sum of row s, and *extreme = row_extreme(t, n, lo) of another row t (the next row of
// a score tile) in the same pass where the CPU allows; the same results as the two calls
float exp_scale_sum_extreme(float* s, int64_t n, float a, float c, const float* t, bool lo, float* extreme);
double exp_scale_sum_extreme(double* s, int64_t n, double a, double c, const double* t, bool lo, double* extreme);
// s <- exp(a * s - c)
void exp_scale(float* s, int64_t n, float a, float c);
void exp_scale(double* s, int64_t n, double a, double c);
// acc <- acc + w * exp(a * s - c)
void exp_scale_axpy(float* acc, const float* s, int64_t n, float a, float c, float w);
void exp_scale_axpy(double* acc, const double* s, int64_t n, double a, double c, double w);
// acc <- acc + w * p
void axpy(float* acc, const float* p, int64_t n, float w);
void axpy(double* acc, const double* p, int64_t n, double w);
// p <- exp(a * p - c), then ds <- a * p * (ds - delta), in one pass where the CPU allows; the same
// results as exp_scale then dsoftmax
void exp_scale_dsoftmax(float* p, float* ds, int64_t n, float a, float c, float delta);
void exp_scale_dsoftmax(double* p, double* ds, int64_t n, double a, double c, double delta);
// ds <- a * p * (ds - d)
void dsoftmax(float* ds, const float* p, int64_t n, float d, float a);
void dsoftmax(double* ds, const double* p, int64_t n, double d, double a);
// o <- o * c
void scale_row(float* o, int64_t n, float c);
void scale_row(double* o, int64_t n, double c);
// sum_j a[j] * b[j] (lane partials, fixed order)
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

}  // namespace cpu
}  // namespace dcal
