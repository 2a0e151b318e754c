// 2-D neighborhood attention (docs/contract.md): the per-element math shared by the C++ CPU kernels
// (na2d_cpu.cpp) and the CUDA kernels (na2d_kernels.cuh), so the CPU tests exercise the same
// window, inverse-window, bias-index and softmax code that the GPU runs.
//
// The first part is plain C++ (no torch): nvcc compiles it standalone for the static kernel
// report. The second part declares the torch entry points for ops.cpp; it is left out when
// DCAL_NA2D_MATH_ONLY is defined (na2d_kernels.cuh does).
#ifndef DCAL_NA2D_MATH_H_
#define DCAL_NA2D_MATH_H_

#include <math.h>

#include "dcal.h"

#ifndef DCAL_HD
#ifdef __CUDACC__
#define DCAL_HD __host__ __device__
#else
#define DCAL_HD
#endif
#endif

namespace dcal {
namespace na2d {

// Border modes as the ints the kernels carry: the codes of dcal::BorderMode (dcal.h).
constexpr int kZero = static_cast<int>(kBorderZero);
constexpr int kMask = static_cast<int>(kBorderMask);
constexpr int kClamp = static_cast<int>(kBorderClamp);

// Dilation (docs/contract.md, Dilation): a window is kernel_size positions `start + dil * u`, u in [0, ks).
// zero/mask: centred on the query like a dilated F.unfold (padding dil * (ks / 2)).
// clamp: NATTEN's rule: the axis splits into `dil` interleaved sub-grids (positions of one
// residue mod dil); a query's window is the ordinary clamp window of its own sub-grid, so every
// query sees ks real positions; needs n >= ks * dil (the shortest sub-grid holds ks positions).
// With dil == 1 every rule is the undilated one.

// Number of positions of the sub-grid of residue g (0 <= g < dil) on an axis of length n.
DCAL_HD inline int subgrid_len(int g, int n, int dil) { return (n - g + dil - 1) / dil; }

// First key position (along one axis of length n) of the window of query i. In zero/mask mode
// it may be negative and the window may run past n: those positions are off the map.
DCAL_HD inline int window_start(int i, int n, int ks, int border, int dil = 1) {
  if (border != kClamp) return i - dil * (ks / 2);
  const int g = i % dil, ig = i / dil, ng = subgrid_len(g, n, dil);
  int s = ig - ks / 2;
  s = s < 0 ? 0 : s;
  s = s > ng - ks ? ng - ks : s;
  return g + dil * s;
}

DCAL_HD inline bool in_window(int key, int query, int n, int ks, int border, int dil = 1) {
  const int off = key - window_start(query, n, ks, border, dil);
  return off >= 0 && off % dil == 0 && off / dil < ks;
}

// Queries lo, lo + dil, ..., hi along one axis whose window holds the on-map key position p: the
// key's inverse neighbourhood, which the backward gathers dK and dV over. A window holds only
// positions of its query's residue mod dil and holds its own query, so candidates lie within
// dil * (ks - 1) of p in steps of dil; window_start is non-decreasing along a sub-grid, so the
// set is one interval of it, and it holds p itself. Testing each candidate with the forward's
// own window function keeps clamp mode (shifted windows) exact.
DCAL_HD inline void inverse_range(int p, int n, int ks, int border, int* lo, int* hi, int dil = 1) {
  const int below = p / dil, above = (n - 1 - p) / dil;
  int a = p - dil * (below < ks - 1 ? below : ks - 1);
  int b = p + dil * (above < ks - 1 ? above : ks - 1);
  while (a < p && !in_window(p, a, n, ks, border, dil)) a += dil;
  while (b > p && !in_window(p, b, n, ks, border, dil)) b -= dil;
  *lo = a;
  *hi = b;
}

// Flat index into one head's [2*ks-1, 2*ks-1] bias table of key (ki, kj) for query (i, j): the
// offset counted in window steps, (key - query) / dil (exact: both share a residue mod dil).
DCAL_HD inline int rpb_index(int ki, int kj, int i, int j, int ks, int dil = 1) {
  return ((ki - i) / dil + ks - 1) * (2 * ks - 1) + ((kj - j) / dil + ks - 1);
}

DCAL_HD inline float na_exp(float x) { return expf(x); }
DCAL_HD inline double na_exp(double x) { return exp(x); }
DCAL_HD inline float na_log(float x) { return logf(x); }
DCAL_HD inline double na_log(double x) { return log(x); }

// Online softmax over the keys of one query: running max m and sum l of exp(s - m). Returns
// true when the max moved, in which case the caller rescales its accumulator by *alpha (at most
// a few times per query, so the common path is one exp and one axpy). *p is exp(s - m).
template <typename T>
DCAL_HD inline bool softmax_update(T& m, T& l, T s, T* alpha, T* p) {
  if (s > m) {
    *alpha = na_exp(m - s);  // m == -inf on the first key: alpha 0, l restarts
    *p = na_exp(s - s);      // 1; NaN for a +inf logit, as PyTorch's softmax gives
    l = l * *alpha + *p;
    m = s;
    return true;
  }
  *p = na_exp(s - m);
  l += *p;
  return false;
}

// logsumexp of the logits from the final (m, l).
template <typename T>
DCAL_HD inline T softmax_lse(T m, T l) {
  return m + na_log(l);
}

// Probability of a logit recomputed in the backward from the forward's logsumexp.
template <typename T>
DCAL_HD inline T softmax_prob(T s, T lse) {
  return na_exp(s - lse);
}

// Gradient of one logit: dS = P * (dP - delta), with dP = dO . v and delta = rowsum(dO * O).
template <typename T>
DCAL_HD inline T logit_grad(T p, T dp, T delta) {
  return p * (dp - delta);
}

}  // namespace na2d
}  // namespace dcal

#endif  // DCAL_NA2D_MATH_H_

#if !defined(DCAL_NA2D_MATH_ONLY) && !defined(DCAL_NA2D_OPS_H_)
#define DCAL_NA2D_OPS_H_
#include <torch/types.h>

#include <tuple>

namespace dcal {

// An uninitialised dense tensor like t whose dims lie in the order of t's strides (decreasing,
// ties in logical order, broadcast dims outermost): how the CPU and CUDA host code allocate out
// and dq (like q), dk (like k) and dv (like v). kernels/_layout.py is the same rule in Python,
// for the fake implementations.
at::Tensor empty_in_order_of(const at::Tensor& t);

// dtype of the logsumexp (and of the backward's statistics) for inputs of dtype t: float64 for
// float64, float32 otherwise.
at::ScalarType na2d_stat_type(at::ScalarType t);

// Argument checks shared by the CPU and CUDA host code (na2d_host.cpp; checks.h's macros, op names
// "na2d" and "na2d_bwd", RuntimeError), run before anything is allocated.
void na2d_check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& rpb, int64_t kernel_size, int64_t border, int64_t dilation);
void na2d_check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse);

// q, k, v [B, H, X, Y, D]; rpb [H, 2*ks-1, 2*ks-1] or undefined; border a dcal::BorderMode;
// dilation >= 1 (docs/contract.md, Dilation).
// Returns (out [B, H, X, Y, D] in q's dim order, lse [B, H, X, Y] contiguous, fp32, fp64 for fp64
// inputs).
std::tuple<at::Tensor, at::Tensor> na2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                int64_t border, double scale, int64_t dilation);
// Returns (dq, dk, dv, drpb) with dq, dk, dv in the dim order of q, k, v; drpb is contiguous, [0]
// when rpb is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const c10::optional<at::Tensor>& rpb,
                                                                        const at::Tensor& out, const at::Tensor& lse,
                                                                        int64_t kernel_size, int64_t border,
                                                                        double scale, int64_t dilation);
// The same, always on the per-window kernels (the SIMD kernels skipped): the private ops
// dcal::_na2d_fwd_window, dcal::_na2d_bwd_window, for comparisons of the two paths in one process.
std::tuple<at::Tensor, at::Tensor> na2d_fwd_window_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                       int64_t border, double scale, int64_t dilation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_window_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t kernel_size,
    int64_t border, double scale, int64_t dilation);

#ifdef DCAL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> na2d_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                 int64_t border, double scale, int64_t dilation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const c10::optional<at::Tensor>& rpb,
                                                                         const at::Tensor& out, const at::Tensor& lse,
                                                                         int64_t kernel_size, int64_t border,
                                                                         double scale, int64_t dilation);
#endif

}  // namespace dcal
#endif  // DCAL_NA2D_OPS_H_
