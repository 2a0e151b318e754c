// 2-D neighborhood attention on CPU, fp32, fp64 and bf16 (docs/contract.md): the register-blocked kernels
// of na2d_cpu_simd.cpp, called by the host code in na2d_cpu.cpp; their results stand when the
// inputs are all finite (the return value).
// Plain C++ (no torch types): tensors arrive as a pointer and five strides.
#pragma once

#include <cstdint>

#include "na2d_cpu_layout.h"

namespace dcal {
namespace na2d_simd {

// The bits of a bfloat16: the storage type of bf16 tensors (the kernels compute in float).
using bf16 = uint16_t;

// A [B, H, X, Y, D] tensor read (In) or written (Out) through its strides, in elements.
template <typename T>
using In = na2d_cpu::Strided<T>;
template <typename T>
using Out = na2d_cpu::StridedOut<T>;

// The geometry of a call, one struct for the host code (na2d_cpu.cpp) and both kernel families:
// q's sizes [B, H, X, Y, D], kernel_size, the border code (na2d::kZero / kMask / kClamp), dilation.
struct Geo {
  int64_t B, H, X, Y, D;
  int ks, border, dil;
};

// out and lse [B, H, X, Y] (contiguous) of the forward. Returns false when a staged input (k, v)
// holds an inf or a NaN: the kernels weigh keys outside a lane's window by 0 where lanes' windows
// differ (clamp borders), and 0 * NaN would reach that lane, so the results are then not to be
// used and the caller runs the per-window kernel instead (na2d_cpu.cpp). The check costs nothing
// extra: every input element is staged once anyway.
bool fwd(const Geo& g, In<float> q, In<float> k, In<float> v, const float* rpb, Out<float> out, float* lse,
         float scale);
bool fwd(const Geo& g, In<double> q, In<double> k, In<double> v, const double* rpb, Out<double> out, double* lse,
         double scale);

// dq, dk, dv written whole (no zeroing needed); bias_part [B * H * dil * dil, (2ks-1)^2] per-slice
// bias-gradient sums (written whole), or null without rpb. lse contiguous [B, H, X, Y].
// Returns false when dout, q, k, v or out holds an inf or a NaN (then as for fwd): the dK, dV
// gather runs over whole rows, where a key outside a query's window enters with weight 0.
bool bwd(const Geo& g, In<float> dout, In<float> q, In<float> k, In<float> v, const float* rpb, In<float> out,
         const float* lse, Out<float> dq, Out<float> dk, Out<float> dv, float* bias_part, float scale);
bool bwd(const Geo& g, In<double> dout, In<double> q, In<double> k, In<double> v, const double* rpb, In<double> out,
         const double* lse, Out<double> dq, Out<double> dk, Out<double> dv, double* bias_part, double scale);

// bf16 tensors on the float kernels: staged rows widened to float, outputs rounded to bf16
// (to nearest even, as torch's conversion); rpb (widened by the caller), lse and bias_part are
// float. The arithmetic is the float kernels' own, so the results are those of fwd / bwd on the
// inputs converted to float, rounded to bf16 bit for bit.
bool fwd(const Geo& g, In<bf16> q, In<bf16> k, In<bf16> v, const float* rpb, Out<bf16> out, float* lse, float scale);
bool bwd(const Geo& g, In<bf16> dout, In<bf16> q, In<bf16> k, In<bf16> v, const float* rpb, In<bf16> out,
         const float* lse, Out<bf16> dq, Out<bf16> dk, Out<bf16> dv, float* bias_part, float scale);

}  // namespace na2d_simd
}  // namespace dcal
