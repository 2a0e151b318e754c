// 2-D neighborhood attention (docs/contract.md, neighborhood_attention2d): the host code shared by
// the CPU (na2d_cpu.cpp) and CUDA (na2d_cuda.cu) entry points: the argument checks every device
// runs before it allocates anything, and the allocation rule of the outputs and gradients.
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "dcal.h"
#include "na2d.h"

namespace dcal {
namespace {

constexpr OpName kNa2d{"na2d", ErrorClasses::kRuntimeErrors};
constexpr OpName kNa2dBwd{"na2d_bwd", ErrorClasses::kRuntimeErrors};

}  // namespace

at::ScalarType na2d_stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor empty_in_order_of(const at::Tensor& t) {
  // Dims outermost first: decreasing stride, ties in logical order (a stable sort), broadcast
  // dims (stride 0) first. kernels/_layout.py is the same rule for the fake implementations.
  std::vector<int64_t> order(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t sa = t.stride(a), sb = t.stride(b);
    if ((sa == 0) != (sb == 0)) return sa == 0;
    return sa > sb;
  });
  return at::empty_permuted(t.sizes(), order, t.options());
}

void na2d_check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& rpb, int64_t kernel_size, int64_t border, int64_t dilation) {
  const OpName& op = kNa2d;
  DCAL_CHECK_SHAPE(op, q.dim() == 5, "q must have 5 dimensions [B, H, X, Y, D], got shape ", q.sizes());
  DCAL_CHECK_SHAPE(op, k.sizes() == q.sizes(), "k has shape ", k.sizes(), "; expected the shape of q ", q.sizes());
  DCAL_CHECK_SHAPE(op, v.sizes() == q.sizes(), "v has shape ", v.sizes(), "; expected the shape of q ", q.sizes());
  DCAL_CHECK_DTYPE(op, k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k (", k.scalar_type(),
                   ") and v (", v.scalar_type(), ") must have the dtype of q (", q.scalar_type(), ")");
  DCAL_CHECK_DEVICE(op, k.device() == q.device() && v.device() == q.device(), "k (", k.device(), ") and v (",
                    v.device(), ") must be on the device of q (", q.device(), ")");
  DCAL_CHECK_ARG(op, kernel_size >= 3 && kernel_size % 2 == 1 && kernel_size < (1 << 15),
                 "kernel_size must be an odd int >= 3 (and < 32768), got ", kernel_size);
  DCAL_CHECK_ARG(op, border == kBorderZero || border == kBorderMask || border == kBorderClamp,
                 "border must be 0 (zero), 1 (mask) or 2 (clamp), got ", border);
  const int64_t X = q.size(2), Y = q.size(3);
  DCAL_CHECK_SHAPE(op, X >= 1 && Y >= 1 && q.size(4) >= 1, "q must have a non-empty map and head dim, got shape ",
                   q.sizes());
  DCAL_CHECK_SHAPE(op, X < (1 << 30) && Y < (1 << 30), "q's map ", X, "x", Y, " is too large (each side < 2**30)");
  DCAL_CHECK_ARG(op, dilation >= 1 && dilation < (1 << 15), "dilation must be an int >= 1 (and < 32768), got ",
                 dilation);
  DCAL_CHECK_ARG(op, border != kBorderClamp || (X >= kernel_size * dilation && Y >= kernel_size * dilation),
                 "border clamp needs a map of at least kernel_size*dilation x kernel_size*dilation (",
                 kernel_size * dilation, "x", kernel_size * dilation, "), got ", X, "x", Y);
  if (rpb.has_value() && rpb->defined()) {
    const int64_t R = 2 * kernel_size - 1;
    DCAL_CHECK_SHAPE(op, rpb->dim() == 3 && rpb->size(0) == q.size(1) && rpb->size(1) == R && rpb->size(2) == R,
                     "rpb must have shape [H, 2*kernel_size-1, 2*kernel_size-1] = [", q.size(1), ", ", R, ", ", R,
                     "], got ", rpb->sizes());
    DCAL_CHECK_DTYPE(op, rpb->scalar_type() == q.scalar_type(), "rpb has dtype ", rpb->scalar_type(),
                     "; expected the dtype of q (", q.scalar_type(), ")");
    DCAL_CHECK_DEVICE(op, rpb->device() == q.device(), "rpb is on ", rpb->device(), "; expected the device of q (",
                      q.device(), ")");
  }
}

void na2d_check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  const OpName& op = kNa2dBwd;
  DCAL_CHECK_SHAPE(op, dout.sizes() == q.sizes(), "dout has shape ", dout.sizes(), "; expected the shape of q ",
                   q.sizes());
  DCAL_CHECK_SHAPE(op, out.sizes() == q.sizes(), "out has shape ", out.sizes(), "; expected the shape of q ",
                   q.sizes());
  DCAL_CHECK_DTYPE(op, dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), "dout (",
                   dout.scalar_type(), ") and out (", out.scalar_type(), ") must have the dtype of q (",
                   q.scalar_type(), ")");
  DCAL_CHECK_SHAPE(op, lse.sizes() == q.sizes().slice(0, 4), "lse has shape ", lse.sizes(),
                   "; expected [B, H, X, Y] = ", q.sizes().slice(0, 4));
  DCAL_CHECK_DTYPE(op, lse.scalar_type() == na2d_stat_type(q.scalar_type()), "lse has dtype ", lse.scalar_type(),
                   "; expected ", na2d_stat_type(q.scalar_type()), " (the forward's logsumexp)");
  DCAL_CHECK_DEVICE(op, dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "dout (", dout.device(), "), out (", out.device(), ") and lse (", lse.device(),
                    ") must be on the device of q (", q.device(), ")");
}

}  // namespace dcal
