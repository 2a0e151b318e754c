"""Autograd shared by every backend of multi_kv_attention: each provides a forward custom op
``(q, k1, v1, k2, v2, scale) -> (out, lse)`` and a backward custom op
``(dout, dlse, q, k1, v1, k2, v2, out, lse, scale) -> [dq, dk1, dv1(, dk2, dv2)]``; this wires
them together the same way for all (FA2's habit: only inputs, output and lse are saved, nothing
when no input needs a gradient).

Every fused backward is first-order only. :func:`once_differentiable` makes a second
differentiation through it raise a clear error naming the op (as ``torch.autograd.function.
once_differentiable`` does), instead of the silent zeros an unregistered backward op would give.
"""

from __future__ import annotations

import functools

import torch

DOUBLE_BACKWARD_HINT = "use backend='reference' (pure PyTorch) for second derivatives"


class _FirstOrderOnly(torch.autograd.Function):
    """Runs a first-order backward as the forward of a node whose own backward raises: its
    outputs (the gradients) hang off every tensor they were computed from, so any later
    differentiation that reaches them, whatever it is taken with respect to, meets the error."""

    @staticmethod
    def forward(ctx, run, msg, *tracked):
        ctx.msg = msg
        outs = run()
        return tuple(o for o in outs if isinstance(o, torch.Tensor))

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.msg)


def once_differentiable(op_name: str, backend: str):
    """Turn ``backward(ctx, saved, *grads) -> grads`` into a ``register_autograd`` backward
    ``(ctx, *grads)``. ``saved`` is ``ctx.saved_tensors``, read here once (activation checkpointing
    allows one read). The backward runs without recording a graph, and when a graph was asked for
    (``create_graph=True`` with inputs that need gradients) its outputs lead to a node that raises
    at the second backward, naming the op."""

    msg = (
        f"dcal: {op_name} (backend {backend!r}) has a first-order backward only: differentiating it twice "
        f"(create_graph=True, double backward, gradient penalty, Hessian-vector product) is not supported; "
        f"{DOUBLE_BACKWARD_HINT}"
    )

    def wrap(backward):
        def finish(ctx, *grads):
            saved = ctx.saved_tensors
            tracked = [t for t in list(grads) + list(saved) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not (torch.is_grad_enabled() and tracked):
                with torch.no_grad():
                    return backward(ctx, saved, *grads)
            box = {}

            def run():
                outs = backward(ctx, saved, *grads)
                box["single"] = not isinstance(outs, tuple)
                box["outs"] = (outs,) if box["single"] else tuple(outs)
                return box["outs"]

            marked = iter(_FirstOrderOnly.apply(run, msg, *tracked))
            res = tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in box["outs"])
            return res[0] if box["single"] else res

        return functools.wraps(backward)(finish)

    return wrap


def register_mkv_autograd(fwd_op, bwd_op, backend: str) -> None:
    def setup_context(ctx, inputs, output):
        q, k1, v1, k2, v2, scale = inputs
        out, lse = output
        ctx.scale = scale
        ctx.two = k2 is not None
        # An unused output (out or lse) then arrives as None, not as a tensor of zeros, so a
        # backend can skip the lse-gradient path.
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:5]):
            ctx.save_for_backward(q, k1, v1, k2, v2, out, lse)

    @once_differentiable("multi_kv_attention", backend)
    def backward(ctx, saved, dout, dlse):
        q, k1, v1, k2, v2, out, lse = saved
        if dout is None:
            dout = torch.zeros_like(out)
        grads = bwd_op(dout, dlse, q, k1, v1, k2, v2, out, lse, ctx.scale)
        if ctx.two:
            return grads[0], grads[1], grads[2], grads[3], grads[4], None
        return grads[0], grads[1], grads[2], None, None, None

    # accepts a Python custom op or a C++ op (by name or OpOverload) alike
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
