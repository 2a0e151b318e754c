// 2-D neighborhood attention (DESIGN 3.4) on CUDA: host code of dcal::na2d_fwd / na2d_bwd.
// Argument checks -> device guard -> allocate -> dispatch (dtype, head-dim bucket, bias flag)
// -> launch; the kernels are in na2d_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <limits>

#include "dcal.h"
#include "na2d.h"
#include "na2d_kernels.cuh"

// Runtime flags and sizes become template arguments (the static_switch.h habit of
// flash-attention); each macro runs its last argument, a lambda, with NAME a constant.
#define NA2D_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                    \
    if (COND) {                            \
      constexpr bool NAME = true;          \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr bool NAME = false;         \
      return __VA_ARGS__();                \
    }                                      \
  }()

// Head dims 16..128 (multiples of 8) run in the smallest bucket that holds them; lanes skip the
// bucket's elements past D, so only the register arrays are sized by the bucket.
#define NA2D_HEADDIM_SWITCH(D, NAME, ...) \
  [&] {                                   \
    if ((D) <= 32) {                      \
      constexpr int NAME = 32;            \
      return __VA_ARGS__();               \
    } else if ((D) <= 64) {               \
      constexpr int NAME = 64;            \
      return __VA_ARGS__();               \
    } else if ((D) <= 96) {               \
      constexpr int NAME = 96;            \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr int NAME = 128;           \
      return __VA_ARGS__();               \
    }                                     \
  }()

#define NA2D_DTYPE_SWITCH(DTYPE, NAME, ...)                                                  \
  [&] {                                                                                      \
    switch (DTYPE) {                                                                         \
      case at::kFloat: {                                                                     \
        using NAME = float;                                                                  \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kHalf: {                                                                      \
        using NAME = __half;                                                                 \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kBFloat16: {                                                                  \
        using NAME = __nv_bfloat16;                                                          \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      default:                                                                               \
        TORCH_CHECK(false, "na2d: dtype ", DTYPE, " not supported on CUDA (float32, float16, bfloat16)"); \
    }                                                                                        \
  }()

namespace dcal {
namespace {

using na2d_cuda::kItems;
using na2d_cuda::kThreads;
using na2d_cuda::Params;

void check_cuda(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor here, got ", q.device());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": q has dtype ", t,
              "; the CUDA kernels take float32, float16 or bfloat16");
  const int64_t D = q.size(4);
  TORCH_CHECK(D >= 16 && D <= 128 && D % 8 == 0, op, ": head dim D = ", D,
              " not supported by the CUDA kernels (16..128, a multiple of 8)");
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int>::max(), op, ": B*H too large");
  TORCH_CHECK(q.size(1) <= 65535, op, ": H = ", q.size(1), " heads is more than the bias-gradient grid takes (65535)");
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename T>
Params<T> geometry(const at::Tensor& q, int64_t kernel_size, int64_t border, double scale) {
  Params<T> p{};
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.X = static_cast<int>(q.size(2));
  p.Y = static_cast<int>(q.size(3));
  p.D = static_cast<int>(q.size(4));
  p.ks = static_cast<int>(kernel_size);
  p.border = static_cast<int>(border);
  p.scale = static_cast<float>(scale);
  return p;
}

// Blocks of kItems queries (or keys) covering all B*H*X*Y tokens.
dim3 token_grid(const at::Tensor& q) {
  const int64_t n = q.numel() / q.size(4);
  const int64_t blocks = (n + kItems - 1) / kItems;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "na2d: too many tokens (", n, ") for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> na2d_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                 int64_t border, double scale, int64_t dilation) {
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  TORCH_CHECK(dilation == 1, "na2d_fwd: dilation ", dilation, " is not implemented by the CUDA kernels; use dilation=1 or the triton backend");
  check_cuda(q, "na2d_fwd");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  auto out = at::empty(qc.sizes(), qc.options());
  auto lse = at::empty(qc.sizes().slice(0, 4), qc.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const dim3 grid = token_grid(qc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NA2D_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    Params<T> p = geometry<T>(qc, kernel_size, border, scale);
    p.q = ptr<T>(qc);
    p.k = ptr<T>(kc);
    p.v = ptr<T>(vc);
    p.rpb = ptr<T>(rc);
    p.o = mut_ptr<T>(out);
    p.lse = lse.data_ptr<float>();
    NA2D_HEADDIM_SWITCH(p.D, kHeadDim, [&] {
      NA2D_BOOL_SWITCH(has_rpb, kHasRpb, [&] {
        na2d_cuda::na2d_fwd_kernel<T, kHeadDim, kHasRpb><<<grid, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t kernel_size,
    int64_t border, double scale, int64_t dilation) {
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  TORCH_CHECK(dilation == 1, "na2d_bwd: dilation ", dilation, " is not implemented by the CUDA kernels; use dilation=1 or the triton backend");
  na2d_check_bwd_args(dout, q, out, lse);
  check_cuda(q, "na2d_bwd");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto doc = dout.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  auto dq = at::empty(qc.sizes(), qc.options());
  auto dk = at::empty(qc.sizes(), qc.options());
  auto dv = at::empty(qc.sizes(), qc.options());
  auto delta = at::empty(qc.sizes().slice(0, 4), qc.options().dtype(at::kFloat));
  const int64_t R = 2 * kernel_size - 1;
  auto drpb = has_rpb ? at::empty({q.size(1), R, R}, qc.options().dtype(at::kFloat)) : at::Tensor();
  if (qc.numel() == 0) {
    return {dq, dk, dv, has_rpb ? at::zeros({q.size(1), R, R}, qc.options()) : at::empty({0}, qc.options())};
  }
  const dim3 grid = token_grid(qc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NA2D_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    Params<T> p = geometry<T>(qc, kernel_size, border, scale);
    p.q = ptr<T>(qc);
    p.k = ptr<T>(kc);
    p.v = ptr<T>(vc);
    p.rpb = ptr<T>(rc);
    p.out = ptr<T>(oc);
    p.dout = ptr<T>(doc);
    p.lse = lc.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = mut_ptr<T>(dq);
    p.dk = mut_ptr<T>(dk);
    p.dv = mut_ptr<T>(dv);
    p.drpb = has_rpb ? drpb.data_ptr<float>() : nullptr;
    NA2D_HEADDIM_SWITCH(p.D, kHeadDim, [&] {
      NA2D_BOOL_SWITCH(has_rpb, kHasRpb, [&] {
        // dQ writes delta, which the other two passes read: same stream, so in order.
        na2d_cuda::na2d_bwd_dq_kernel<T, kHeadDim, kHasRpb><<<grid, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        na2d_cuda::na2d_bwd_dkdv_kernel<T, kHeadDim, kHasRpb><<<grid, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (has_rpb) {
        const dim3 bias_grid(static_cast<unsigned>(R * R), static_cast<unsigned>(q.size(1)));
        na2d_cuda::na2d_bwd_drpb_kernel<T, kHeadDim><<<bias_grid, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {dq, dk, dv, has_rpb ? drpb.to(q.scalar_type()) : at::empty({0}, qc.options())};
}

}  // namespace dcal
