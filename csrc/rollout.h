// Attention rollout (docs/contract.md, attention_rollout) on CPU: declarations included from ops.cpp.
#pragma once
#include <torch/types.h>

namespace dcal {

// Row 0 of S_L @ ... @ S_1 with S_l = (1 - residual) * mean_h softmax(q_l k_l^T * scale) + residual * I.
// qs, ks: L tensors [B, H, N, D] (fp32, fp64 or bf16); lses: empty (recomputed) or L tensors
// [B, H, N]. Returns [B, N] fp32 (fp64 for fp64 inputs). Extra memory O(B*H*N).
at::Tensor rollout_cpu(at::TensorList qs, at::TensorList ks, at::TensorList lses, double scale, double residual);

}  // namespace dcal
