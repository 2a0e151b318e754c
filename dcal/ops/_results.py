"""What every backend's results pass through on the way out: the empty result, and the layout rule.

Empty result: where the math defines an empty output (B, H, Nq or a map side = 0) the public op
returns it from :func:`empty_result` without calling any backend kernel; its gradients are zeros
(in each input's dim order), so a training step over an empty batch works on every backend alike.

Layout rule (README "Additions to the design contract", docs/inputs.md): ``out`` and ``dq`` are
dense in q's dim order, ``dk`` in k's, ``dv`` in v's (:func:`dcal.kernels._layout.empty_in_order_of`:
dims by decreasing stride, ties in logical order, broadcast dims outermost); statistics (lse) and
``drpb`` are contiguous. Backends that already write this layout cost nothing here (a stride
comparison); others get one copy of the tensor concerned (linear memory). Dims of size 1 have no
place in memory, so a result that differs only in their strides is re-strided without a copy.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from dcal.kernels._layout import dim_order, empty_in_order_of


def order_strides(t: Tensor) -> List[int]:
    """The strides :func:`empty_in_order_of` gives a tensor of t's shape (no allocation)."""
    shape = t.shape
    strides = [0] * t.dim()
    acc = 1
    for d in reversed(dim_order(t)):
        strides[d] = acc
        acc *= max(shape[d], 1)
    return strides


def _same_memory_layout(t: Tensor, want: Sequence[int]) -> bool:
    return all(n <= 1 or s == w for n, s, w in zip(t.shape, t.stride(), want))


def in_order_of(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (shape of ref) laid out in ref's dim order: itself, a re-strided view when only
    size-1 dims differ, else a copy. Differentiable."""
    want = order_strides(ref)
    if list(t.stride()) == want:
        return t
    if t.numel() == 0 or _same_memory_layout(t, want):
        return t.as_strided(t.shape, want)
    out = torch.empty_permuted(ref.shape, dim_order(ref), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _same_view(x: Tensor) -> Tensor:
    """A view of x with x's exact strides (``view_as`` renormalises the strides of size-1 dims)."""
    return x.as_strided(x.shape, x.stride())  # storage offset: x's own


class _GradInOrder(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the dim order of the input."""

    @staticmethod
    def forward(ctx, x):
        ctx.want = order_strides(x)
        ctx.order = dim_order(x)
        return _same_view(x)

    @staticmethod
    def backward(ctx, g):
        if g is None or list(g.stride()) == ctx.want:
            return g
        if g.numel() == 0 or _same_memory_layout(g, ctx.want):
            return g.as_strided(g.shape, ctx.want)
        return torch.empty_permuted(g.shape, ctx.order, dtype=g.dtype, device=g.device).copy_(g)


def grad_in_order(x: Optional[Tensor]) -> Optional[Tensor]:
    """x for a backend call: when it needs a gradient, the gradient comes back in x's dim order."""
    if x is None or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _GradInOrder.apply(x)


class _EmptyResult(torch.autograd.Function):
    """Empty outputs with a graph to the inputs: the gradient of every input is zeros."""

    @staticmethod
    def forward(ctx, specs, contiguous, *inputs):
        # gradients: zeros in each input's dim order (contiguous for the inputs flagged so: rpb)
        ctx.metas = [
            (x.shape, list(range(x.dim())) if c else dim_order(x), x.dtype, x.device) if isinstance(x, Tensor) else None
            for x, c in zip(inputs, contiguous)
        ]
        return tuple(fn() for fn in specs)

    @staticmethod
    def backward(ctx, *grads):
        res = [None, None]
        for m in ctx.metas:
            if m is None:
                res.append(None)
            else:
                shape, order, dtype, device = m
                res.append(torch.empty_permuted(shape, order, dtype=dtype, device=device).zero_())
        return tuple(res)


def empty_result(specs, inputs: Sequence[Optional[Tensor]], contiguous: Sequence[bool] = ()):
    """The outputs made by ``specs`` (callables returning empty tensors), attached to ``inputs`` so
    that their gradients are zeros when a graph is recorded (contiguous for the inputs flagged in
    ``contiguous``, else in the input's dim order)."""
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
        flags = tuple(contiguous) + (False,) * (len(inputs) - len(contiguous))
        return _EmptyResult.apply(specs, flags, *inputs)
    return tuple(fn() for fn in specs)


class _Attach(torch.autograd.Function):
    """out unchanged; ``extra`` inputs (key/value segments without tokens) get zero gradients."""

    @staticmethod
    def forward(ctx, out, *extra):
        ctx.metas = [(x.shape, dim_order(x), x.dtype, x.device) for x in extra]
        return _same_view(out)

    @staticmethod
    def backward(ctx, g):
        return (g,) + tuple(torch.empty_permuted(s, o, dtype=d, device=dev).zero_() for s, o, d, dev in ctx.metas)


def attach(out: Tensor, extra: Sequence[Tensor]) -> Tensor:
    extra = [x for x in extra if x.requires_grad]
    if not extra or not torch.is_grad_enabled():
        return out
    return _Attach.apply(out, *extra)


def unread(t: Tensor) -> Tensor:
    """Zeros in place of ``t`` (same shape, dtype, device and dim order, no gradient): what a
    backend gets for q and k when scale = 0, where the logits are 0 whatever q and k hold."""
    return torch.empty_permuted(t.shape, dim_order(t), dtype=t.dtype, device=t.device).zero_()


def empty_in_order(ref: Tensor, dtype=None) -> Tensor:
    return empty_in_order_of(ref, dtype=dtype)
