// Multi-segment (PWCA) attention on CPU (docs/contract.md, multi_kv_attention): declarations included from ops.cpp.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dcal {

// softmax(q [k1; k2]^T * scale) [v1; v2] over one or two key/value segments, never concatenated.
// q, k*, v*: [B, H, N, D] fp32/fp64. Returns out [B, H, Nq, D] and lse [B, H, Nq] (input dtype).
std::tuple<at::Tensor, at::Tensor> mkv_fwd_cpu(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                                               const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
                                               double scale);

// Gradients (dq, dk1, dv1[, dk2, dv2]), contiguous; dlse (optional) is the gradient of lse.
std::vector<at::Tensor> mkv_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                    const at::Tensor& k1, const at::Tensor& v1, const std::optional<at::Tensor>& k2,
                                    const std::optional<at::Tensor>& v2, const at::Tensor& out, const at::Tensor& lse,
                                    double scale);

}  // namespace dcal
