"""The ``"triton"`` backend of neighborhood_attention2d (kernels in :mod:`dcal.kernels.na2d`).

Two ``dcal::`` ops built with ``torch.library.triton_op`` (so ``torch.compile`` sees the kernels):
``na2d_fwd_triton`` -> (out, lse) and ``na2d_bwd_triton`` -> [dq, dk, dv(, drpb)], with exact
fake implementations and autograd registered on the forward. The launch configuration is chosen
once per call by :func:`dcal.kernels.na2d.launch_config`, passed to the forward op as a list of
ints and kept on ``ctx`` for the backward. Only q, k, v, rpb, out and the fp32 lse are saved;
q, k, v (and dout) are read through their strides, never copied, so any view of
[B, H, X, Y, D] runs in place (NATTEN's heads-last, fused-qkv slices, channels-first maps), and
out, dq, dk, dv take the dim order of q, q, k, v (:func:`dcal.kernels._layout.empty_in_order_of`,
the fakes' rule too).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op

from dcal.kernels import na2d as K
from dcal.kernels._layout import empty_in_order_of
from dcal.ops._autograd import once_differentiable


@triton_op("dcal::na2d_fwd_triton", mutates_args=())
def na2d_fwd_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    kernel_size: int,
    border: str,
    scale: float,
    config: List[int],
    dilation: int = 1,
) -> Tuple[Tensor, Tensor]:
    return K.na2d_fwd(q, k, v, rpb, kernel_size, border, scale, K.unpack_config(config), dilation=dilation)


@na2d_fwd_triton.register_fake
def _(q, k, v, rpb, kernel_size, border, scale, config, dilation=1):
    B, H, X, Y, _ = q.shape
    return empty_in_order_of(q), q.new_empty((B, H, X, Y), dtype=torch.float32)


@triton_op("dcal::na2d_bwd_triton", mutates_args=())
def na2d_bwd_triton(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    kernel_size: int,
    border: str,
    scale: float,
    config: List[int],
    need_drpb: bool,
    dilation: int = 1,
) -> List[Tensor]:
    dq, dk, dv, drpb = K.na2d_bwd(
        dout,
        q,
        k,
        v,
        rpb,
        out,
        lse,
        kernel_size,
        border,
        scale,
        K.unpack_config(config),
        need_drpb=need_drpb,
        dlse=dlse,
        dilation=dilation,
    )
    return [dq, dk, dv] if drpb is None else [dq, dk, dv, drpb]


@na2d_bwd_triton.register_fake
def _(dout, dlse, q, k, v, rpb, out, lse, kernel_size, border, scale, config, need_drpb, dilation=1):
    res = [empty_in_order_of(t) for t in (q, k, v)]
    if rpb is not None and need_drpb:
        res.append(torch.empty_like(rpb, memory_format=torch.contiguous_format))
    return res


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, border, scale, config, dilation = inputs
    out, lse = output
    ctx.args = (kernel_size, border, scale, list(config))
    ctx.dilation = dilation
    ctx.has_rpb = rpb is not None
    if any(ctx.needs_input_grad[:4]):  # save nothing when no input needs a gradient
        ctx.save_for_backward(q, k, v, rpb, out, lse)


@once_differentiable("neighborhood_attention2d", "triton")
def _backward(ctx, saved, dout, dlse):
    q, k, v, rpb, out, lse = saved
    if dout is None:
        dout = torch.zeros_like(out)
    need_drpb = ctx.has_rpb and ctx.needs_input_grad[3]
    grads = na2d_bwd_triton(dout, dlse, q, k, v, rpb, out, lse, *ctx.args, need_drpb, ctx.dilation)
    drpb = grads[3] if need_drpb else None
    return grads[0], grads[1], grads[2], drpb, None, None, None, None, None


na2d_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def na2d_triton(q, k, v, rpb, kernel_size, border, scale, dilation=1):
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`)."""
    config = K.pack_config(K.launch_config(q.shape[-1], q.dtype))
    out, _ = na2d_fwd_triton(q, k, v, rpb, int(kernel_size), border, float(scale), config, int(dilation))
    return out
