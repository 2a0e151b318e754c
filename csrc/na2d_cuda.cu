// 2-D neighborhood attention (docs/contract.md) on CUDA: host code of dcal::na2d_fwd / na2d_bwd.
// Each entry point reads: argument checks -> device guard -> allocate -> dispatch, where
// dispatch() (one helper for both) fills the Params every kernel shares, switches on dtype,
// head-dim bucket, bias flag and unit head-dim stride, and hands the launch to a templated lambda. The kernels are in
// na2d_kernels.cuh. q, k, v, dout and out are passed with their strides, never copied; out, dq,
// dk and dv are allocated in the dim order of q, q, k, v (empty_in_order_of) and written through
// their strides.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <initializer_list>
#include <limits>

#include "checks.h"
#include "dcal.h"
#include "na2d.h"
#include "na2d_kernels.cuh"

// Runtime flags and sizes become template arguments (the static_switch.h habit of
// flash-attention); each macro runs its last argument, a lambda, with NAME a constant.
#define NA2D_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                   \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
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

#define NA2D_DTYPE_SWITCH(DTYPE, NAME, ...)                                                                     \
  [&] {                                                                                                         \
    switch (DTYPE) {                                                                                            \
      case at::kFloat: {                                                                                        \
        using NAME = float;                                                                                     \
        return __VA_ARGS__();                                                                                   \
      }                                                                                                         \
      case at::kHalf: {                                                                                         \
        using NAME = __half;                                                                                    \
        return __VA_ARGS__();                                                                                   \
      }                                                                                                         \
      case at::kBFloat16: {                                                                                     \
        using NAME = __nv_bfloat16;                                                                             \
        return __VA_ARGS__();                                                                                   \
      }                                                                                                         \
      default:                                                                                                  \
        DCAL_CHECK_DTYPE(kNa2d, false, "dtype ", DTYPE, " not supported on CUDA (float32, float16, bfloat16)"); \
    }                                                                                                           \
  }()

namespace dcal {
namespace {

// The op name of the dtype switch's fallback (unreachable past check_cuda_args).
constexpr OpName kNa2d{"na2d", ErrorClasses::kRuntimeErrors};

using na2d_cuda::kItems;
using na2d_cuda::kThreads;
using na2d_cuda::Params;
using na2d_cuda::Strides;

// What every launch of one call shares: the inputs as given (any strides) and the geometry.
struct Inputs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  at::Tensor rpb;  // contiguous, or undefined without a bias
  int64_t kernel_size, border, dilation;
  double scale;
};

constexpr OpName kFwd{"na2d_fwd", ErrorClasses::kRuntimeErrors};
constexpr OpName kBwd{"na2d_bwd", ErrorClasses::kRuntimeErrors};

// Blocks of kItems queries (or keys) covering all B*H*X*Y tokens.
int64_t token_blocks(const at::Tensor& q) { return (q.numel() / q.size(4) + kItems - 1) / kItems; }

// Argument checks of both entry points: the ones shared with the CPU host (na2d_check_args) and
// what the CUDA kernels add (device, dtype, head dim, grid limits).
void check_cuda_args(const OpName& op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& rpb, int64_t kernel_size, int64_t border, int64_t dilation) {
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  DCAL_CHECK_DEVICE(op, q.is_cuda(), "q must be a CUDA tensor here, got ", q.device());
  const auto t = q.scalar_type();
  DCAL_CHECK_DTYPE(op, t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "q has dtype ", t,
                   "; the CUDA kernels take float32, float16 or bfloat16");
  const int64_t D = q.size(4);
  DCAL_CHECK_SHAPE(op, D >= 16 && D <= 128 && D % 8 == 0, "head dim D = ", D,
                   " not supported by the CUDA kernels (16..128, a multiple of 8)");
  DCAL_CHECK_ARG(op, q.size(0) * q.size(1) <= std::numeric_limits<int>::max(), "B*H = ", q.size(0) * q.size(1),
                 " is too large for the CUDA grid");
  DCAL_CHECK_ARG(op, q.size(1) <= 65535, "H = ", q.size(1), " heads is more than the bias-gradient grid takes (65535)");
  DCAL_CHECK_ARG(op, token_blocks(q) <= std::numeric_limits<int>::max(), "too many tokens (", q.numel() / D,
                 ") for one launch");
  const int64_t R = 2 * kernel_size - 1;
  DCAL_CHECK_ARG(op, R * R <= std::numeric_limits<int>::max(), "kernel_size ", kernel_size,
                 " is too large for the CUDA kernels' bias index");
}

// The inputs of a checked call as the kernels read them (the bias contiguous: one small copy at most).
Inputs inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& rpb,
                 int64_t kernel_size, int64_t border, double scale, int64_t dilation) {
  const bool has_rpb = rpb.has_value() && rpb->defined();
  return Inputs{q, k, v, has_rpb ? rpb->contiguous() : at::Tensor(), kernel_size, border, dilation, scale};
}

Strides strides(const at::Tensor& t) {
  return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// The grid of the token kernels (check_cuda_args bounds it).
dim3 token_grid(const at::Tensor& q) { return dim3(static_cast<unsigned>(token_blocks(q))); }

// Runs launch.template operator()<T, kHeadDim, kHasRpb, kUnitD>(p) with T the element type of q,
// kHeadDim the head-dim bucket, kHasRpb whether a bias is given and kUnitD whether every tensor
// the kernels read or write (q, k, v and `more`) has a unit head-dim stride; p carries the
// geometry and the inputs (pointers and strides), the lambda adds its outputs and launches.
template <typename Launch>
void dispatch(const Inputs& in, std::initializer_list<const at::Tensor*> more, Launch&& launch) {
  bool unit_d = in.q.stride(4) == 1 && in.k.stride(4) == 1 && in.v.stride(4) == 1;
  for (const at::Tensor* t : more) unit_d = unit_d && t->stride(4) == 1;
  NA2D_DTYPE_SWITCH(in.q.scalar_type(), T, [&] {
    Params<T> p{};
    p.B = static_cast<int>(in.q.size(0));
    p.H = static_cast<int>(in.q.size(1));
    p.X = static_cast<int>(in.q.size(2));
    p.Y = static_cast<int>(in.q.size(3));
    p.D = static_cast<int>(in.q.size(4));
    p.ks = static_cast<int>(in.kernel_size);
    p.border = static_cast<int>(in.border);
    p.dil = static_cast<int>(in.dilation);
    p.scale = static_cast<float>(in.scale);
    p.q = reinterpret_cast<const T*>(in.q.data_ptr());
    p.k = reinterpret_cast<const T*>(in.k.data_ptr());
    p.v = reinterpret_cast<const T*>(in.v.data_ptr());
    p.rpb = in.rpb.defined() ? reinterpret_cast<const T*>(in.rpb.data_ptr()) : nullptr;
    p.sq = strides(in.q);
    p.sk = strides(in.k);
    p.sv = strides(in.v);
    NA2D_HEADDIM_SWITCH(p.D, kHeadDim, [&] {
      NA2D_BOOL_SWITCH(in.rpb.defined(), kHasRpb, [&] {
        NA2D_BOOL_SWITCH(unit_d, kUnitD, [&] { launch.template operator()<T, kHeadDim, kHasRpb, kUnitD>(p); });
      });
    });
  });
}

template <typename T>
T* out_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> na2d_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                 int64_t border, double scale, int64_t dilation) {
  check_cuda_args(kFwd, q, k, v, rpb, kernel_size, border, dilation);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const Inputs in = inputs_of(q, k, v, rpb, kernel_size, border, scale, dilation);
  auto out = empty_in_order_of(q);  // [B, H, X, Y, D] in q's dim order
  auto lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const dim3 grid = token_grid(q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in, {&out}, [&]<typename T, int kHeadDim, bool kHasRpb, bool kUnitD>(Params<T> p) {
    p.o = out_ptr<T>(out);
    p.sout = strides(out);
    p.lse = lse.data_ptr<float>();
    na2d_cuda::na2d_fwd_kernel<T, kHeadDim, kHasRpb, kUnitD><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const c10::optional<at::Tensor>& rpb,
                                                                         const at::Tensor& out, const at::Tensor& lse,
                                                                         int64_t kernel_size, int64_t border,
                                                                         double scale, int64_t dilation) {
  check_cuda_args(kBwd, q, k, v, rpb, kernel_size, border, dilation);
  na2d_check_bwd_args(dout, q, out, lse);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const Inputs in = inputs_of(q, k, v, rpb, kernel_size, border, scale, dilation);
  const auto lc = lse.contiguous();  // [B, H, X, Y] fp32: small, and contiguous when it comes from the forward
  auto dq = empty_in_order_of(q);    // the dim orders of q, k, v
  auto dk = empty_in_order_of(k);
  auto dv = empty_in_order_of(v);
  auto delta = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  const int64_t H = q.size(1), R = 2 * kernel_size - 1;
  const bool has_rpb = in.rpb.defined();
  auto drpb = has_rpb ? at::empty({H, R, R}, q.options().dtype(at::kFloat)) : at::Tensor();
  if (q.numel() == 0) {
    return {dq, dk, dv, has_rpb ? at::zeros({H, R, R}, q.options()) : at::empty({0}, q.options())};
  }
  const dim3 grid = token_grid(q);
  const dim3 bias_grid(static_cast<unsigned>(R * R), static_cast<unsigned>(H));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in, {&out, &dout, &dq, &dk, &dv}, [&]<typename T, int kHeadDim, bool kHasRpb, bool kUnitD>(Params<T> p) {
    p.out = reinterpret_cast<const T*>(out.data_ptr());
    p.dout = reinterpret_cast<const T*>(dout.data_ptr());
    p.sout = strides(out);
    p.sdo = strides(dout);
    p.lse = lc.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = out_ptr<T>(dq);
    p.dk = out_ptr<T>(dk);
    p.dv = out_ptr<T>(dv);
    p.sdq = strides(dq);
    p.sdk = strides(dk);
    p.sdv = strides(dv);
    p.drpb = has_rpb ? drpb.data_ptr<float>() : nullptr;
    // dQ writes delta, which the other passes read: same stream, so in order.
    na2d_cuda::na2d_bwd_dq_kernel<T, kHeadDim, kHasRpb, kUnitD><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    na2d_cuda::na2d_bwd_dkdv_kernel<T, kHeadDim, kHasRpb, kUnitD><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (kHasRpb) {
      na2d_cuda::na2d_bwd_drpb_kernel<T, kHeadDim, kUnitD><<<bias_grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv, has_rpb ? drpb.to(q.scalar_type()) : at::empty({0}, q.options())};
}

}  // namespace dcal
