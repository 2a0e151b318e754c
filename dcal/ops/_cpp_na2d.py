"""The ``"cpp"`` backend of neighborhood_attention2d: Python side of the C++/CUDA ops
``dcal::na2d_fwd`` and ``dcal::na2d_bwd`` (schemas and kernels in ``csrc/``).

Here: exact fake (meta) implementations (out and dq in q's dim order, dk in k's, dv in v's:
:func:`dcal.kernels._layout.empty_in_order_of`, the rule the C++ host code allocates by), so the
ops trace under ``torch.compile(fullgraph=True)`` and run on the meta device; autograd for
``na2d_fwd`` whose backward is the ``na2d_bwd`` op (gradients of q, k, v and rpb); and the
backend entry point :func:`na2d_cpp`. Only q, k, v, rpb, the output and the logsumexp are saved
for backward, and nothing when no input needs a gradient. The logsumexp output is a statistic,
not differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcal import _ext
from dcal.kernels._common import BORDER_CODES as BORDER_IDS  # name -> dcal::BorderMode value
from dcal.kernels._layout import empty_in_order_of
from dcal.ops._autograd import once_differentiable

_ext.require()  # an ImportError with build instructions; the dispatcher reports it as the reason


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dcal::na2d_fwd")
def _na2d_fwd_fake(q, k, v, rpb, kernel_size, border, scale, dilation=1):
    out = empty_in_order_of(q)
    lse = q.new_empty(q.shape[:4], dtype=_stat_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("dcal::na2d_bwd")
def _na2d_bwd_fake(dout, q, k, v, rpb, out, lse, kernel_size, border, scale, dilation=1):
    drpb = rpb.new_empty(rpb.shape) if rpb is not None else q.new_empty((0,))
    return empty_in_order_of(q), empty_in_order_of(k), empty_in_order_of(v), drpb


@torch.library.register_fake("dcal::_na2d_fwd_window")
def _na2d_fwd_window_fake(q, k, v, rpb, kernel_size, border, scale, dilation=1):
    return _na2d_fwd_fake(q, k, v, rpb, kernel_size, border, scale, dilation)


@torch.library.register_fake("dcal::_na2d_bwd_window")
def _na2d_bwd_window_fake(dout, q, k, v, rpb, out, lse, kernel_size, border, scale, dilation=1):
    return _na2d_bwd_fake(dout, q, k, v, rpb, out, lse, kernel_size, border, scale, dilation)


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, border, scale, dilation = inputs
    out, lse = output
    ctx.kernel_size, ctx.border, ctx.scale, ctx.dilation = kernel_size, border, scale, dilation
    ctx.has_rpb = rpb is not None
    ctx.mark_non_differentiable(lse)
    if any(ctx.needs_input_grad[:4]):  # save nothing when no input needs a gradient
        ctx.save_for_backward(q, k, v, rpb, out, lse)


@once_differentiable("neighborhood_attention2d", "cpp")
def _backward(ctx, saved, dout, dlse):
    q, k, v, rpb, out, lse = saved
    dq, dk, dv, drpb = torch.ops.dcal.na2d_bwd(
        dout, q, k, v, rpb, out, lse, ctx.kernel_size, ctx.border, ctx.scale, ctx.dilation
    )
    return dq, dk, dv, (drpb if ctx.has_rpb else None), None, None, None, None


torch.library.register_autograd("dcal::na2d_fwd", _backward, setup_context=_setup_context)


def na2d_cpp(
    q: Tensor, k: Tensor, v: Tensor, rpb, kernel_size: int, border: str, scale: float, dilation: int = 1
) -> Tensor:
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`): [B, H, X, Y, D] out.

    float16 on CPU runs the float32 kernels on float32 copies (linear memory, the copies keep
    the inputs' dim order) and casts the output (and the gradients) back to float16."""
    if q.dtype == torch.float16 and q.device.type == "cpu":
        c = lambda t: None if t is None else t.float()  # noqa: E731
        out, _ = torch.ops.dcal.na2d_fwd(
            c(q), c(k), c(v), c(rpb), int(kernel_size), BORDER_IDS[border], float(scale), int(dilation)
        )
        return out.half()
    out, _ = torch.ops.dcal.na2d_fwd(q, k, v, rpb, int(kernel_size), BORDER_IDS[border], float(scale), int(dilation))
    return out


class _Window(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size, border, scale, dilation):
        out, lse = torch.ops.dcal._na2d_fwd_window(q, k, v, rpb, kernel_size, border, scale, dilation)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.args = (kernel_size, border, scale, dilation)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = torch.ops.dcal._na2d_bwd_window(dout, q, k, v, rpb, out, lse, *ctx.args)
        return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None


def _na2d_window(
    q: Tensor, k: Tensor, v: Tensor, rpb=None, kernel_size: int = 7, border: str = "zero", scale=None, dilation: int = 1
) -> Tensor:
    """Private: the CPU op on its per-window kernels only (the SIMD kernels skipped), forward and
    backward, for comparisons of the two paths in one process (tests, ``bench.neighborhood``'s
    ``dcal_window`` provider). No argument checks beyond the C++ ones; not a public API."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _Window.apply(q, k, v, rpb, int(kernel_size), BORDER_IDS[border], float(scale), int(dilation))
