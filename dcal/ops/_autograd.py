"""Autograd shared by every backend of multi_kv_attention: each provides a forward custom op
``(q, k1, v1, k2, v2, scale) -> (out, lse)`` and a backward custom op
``(dout, dlse, q, k1, v1, k2, v2, out, lse, scale) -> [dq, dk1, dv1(, dk2, dv2)]``; this wires
them together the same way for all (FA2's habit: only inputs, output and lse are saved, nothing
when no input needs a gradient)."""
from __future__ import annotations

import torch


def register_mkv_autograd(fwd_op, bwd_op) -> None:
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

    def backward(ctx, dout, dlse):
        q, k1, v1, k2, v2, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = bwd_op(dout, dlse, q, k1, v1, k2, v2, out, lse, ctx.scale)
        if ctx.two:
            return grads[0], grads[1], grads[2], grads[3], grads[4], None
        return grads[0], grads[1], grads[2], None, None, None

    # accepts a Python custom op or a C++ op (by name or OpOverload) alike
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
