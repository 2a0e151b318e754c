"""The ``"sdpa"`` backend of multi_kv_attention: one PyTorch fused SDPA call per key/value segment
(the kernels that return a logsumexp), merged exactly through the logsumexps.

Forward: ``(o_s, lse_s)`` per segment; ``lse = logsumexp_s lse_s``; ``o = sum_s o_s exp(lse_s - lse)``.
Backward: each segment's SDPA backward, run with the *merged* output and logsumexp, yields exactly
that segment's dK, dV and its share of dQ (its probabilities are ``exp(s - lse)`` with the merged
lse, and ``delta = rowsum(dO * O)`` with the merged O); the dQ shares are summed. A gradient
arriving on the returned lse adds ``P * dlse`` to the score gradient; SDPA backward has no input
for it, so it is folded into delta by padding the head dim with a column that is 0 in q, k, v, 1
in O and ``-dlse`` in dO (scores and dP unchanged, ``delta -> delta - dlse``).

Non-finite inputs: PyTorch's fused kernels do not propagate NaN and inf as the reference does (a
NaN in one query row gives zeros in that row on the CPU flash kernel). So both ops first check
their inputs (``q``, ``k``, ``v``; backward also ``dout`` and ``dlse``: one read pass, a boolean
temporary of the input's size), and when any holds a NaN or inf they compute that call exactly
instead: through the C++ kernels ``dcal::mkv_fwd`` / ``dcal::mkv_bwd`` (fp32, fp64 for fp64;
linear memory) on CPU when the extension is built, else through the materialising reference
formula. Finite inputs, the normal case, take SDPA. Either way an output or gradient is
non-finite exactly where the reference's is.

This file is also the pattern for every dcal custom op: ``torch.library.custom_op`` in the
``dcal::`` namespace, an exact fake (meta) implementation, autograd registered with
``register_autograd`` whose backward is itself a custom op, and only inputs, output and the
logsumexp saved for backward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from dcal import _ext
from dcal.ops._autograd import register_mkv_autograd

aten = torch.ops.aten


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(k1, v1, k2, v2):
    return [(k1, v1)] if k2 is None else [(k1, v1), (k2, v2)]


def _seg_fwd(q, k, v, scale) -> Tuple[Tensor, Tensor]:
    """One fused SDPA call: (out [B, H, Nq, D], lse [B, H, Nq])."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[2]]  # the CUDA kernel pads lse's token axis


def _seg_bwd(dout, q, k, v, out, lse, scale) -> Tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, scale=scale
        )
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout,
        q,
        k,
        v,
        torch.empty(0, device=q.device, dtype=q.dtype),
        out,
        lse.contiguous(),
        seed,
        seed,
        0.0,
        [True, True, True, False],
        False,
        scale=scale,
    )
    return dq, dk, dv


_PAD = 8  # head-dim padding of the lse-gradient path (CUDA SDPA wants multiples of 8)


def _grad_like(t: Tensor) -> Tensor:
    """An empty gradient for ``t`` [B, H, N, D] in the layout the backward returns: on CPU the
    fused kernel's own [B, N, H, D] storage (copying each gradient to [B, H, N, D] would cost
    four extra [B, H, N, D] buffers and lose to SDPA over torch.cat), contiguous on CUDA."""
    if t.device.type == "cpu":
        B, H, N, D = t.shape
        return t.new_empty((B, N, H, D)).transpose(1, 2)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _as_grad(t: Tensor) -> Tensor:
    """``t`` in the layout of :func:`_grad_like` (a no-op for what the fused kernels return)."""
    if t.device.type == "cpu":
        return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def _pad_col(t: Tensor, first: Optional[Tensor] = None) -> Tensor:
    """t with _PAD more head-dim columns: zeros, except column 0 set to ``first`` when given."""
    extra = t.new_zeros(*t.shape[:-1], _PAD)
    if first is not None:
        extra[..., 0] = first.to(t.dtype)
    return torch.cat([t, extra], dim=-1)


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def _exact_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_cpp(q: Tensor) -> bool:
    return q.device.type == "cpu" and _ext.HAS_EXTENSION


def _exact_fwd(q, k1, v1, k2, v2, scale):
    """(out, lse) exactly as the reference propagates NaN/inf (see the module docstring)."""
    sd = _stat_dtype(q.dtype)
    if _use_cpp(q):
        import dcal.ops._cpp_mkv  # noqa: F401  (registers the fake implementations)

        up = _exact_dtype(q.dtype)
        c = lambda t: None if t is None else t.to(up)  # noqa: E731
        out, lse = torch.ops.dcal.mkv_fwd(c(q), c(k1), c(v1), c(k2), c(v2), scale)
        return out.to(q.dtype).contiguous(), lse.to(sd).contiguous()
    from dcal.ops import reference

    out, lse = reference.multi_kv_attention(q, _segments(k1, v1, k2, v2), scale=scale, return_lse=True)
    return out.contiguous(), lse.to(sd).contiguous()


def _exact_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale) -> List[Tensor]:
    segs = _segments(k1, v1, k2, v2)
    if _use_cpp(q):
        up = _exact_dtype(q.dtype)
        c = lambda t: None if t is None else t.to(up)  # noqa: E731
        grads = torch.ops.dcal.mkv_bwd(c(dout), c(dlse), c(q), c(k1), c(v1), c(k2), c(v2), c(out), c(lse), scale)
        return [g.to(q.dtype) for g in grads]
    from dcal.ops import reference

    with torch.enable_grad():
        ins = [t.detach().requires_grad_() for t in [q] + [x for kv in segs for x in kv]]
        o, l = reference.multi_kv_attention(
            ins[0], [(ins[1 + 2 * i], ins[2 + 2 * i]) for i in range(len(segs))], scale=scale, return_lse=True
        )
        outs, gs = [o], [dout]
        if dlse is not None:
            outs.append(l)
            gs.append(dlse.to(l.dtype))
        return list(torch.autograd.grad(outs, ins, gs))


@torch.library.custom_op("dcal::mkv_sdpa_fwd", mutates_args=())
def mkv_sdpa_fwd(
    q: Tensor, k1: Tensor, v1: Tensor, k2: Optional[Tensor], v2: Optional[Tensor], scale: float
) -> Tuple[Tensor, Tensor]:
    if not _finite(q, k1, v1, k2, v2):
        return _exact_fwd(q, k1, v1, k2, v2, scale)
    q = q.contiguous()
    parts = [_seg_fwd(q, k.contiguous(), v.contiguous(), scale) for k, v in _segments(k1, v1, k2, v2)]
    if len(parts) == 1:
        out, lse = parts[0]
        return out.contiguous(), lse.to(_stat_dtype(q.dtype)).contiguous()
    sd = _stat_dtype(q.dtype)
    (o1, l1), (o2, l2) = parts
    l1, l2 = l1.to(sd), l2.to(sd)
    lse = torch.logaddexp(l1, l2)  # [B, H, Nq]
    w2 = torch.exp(l2 - lse).unsqueeze(-1)  # [B, H, Nq, 1]: the second segment's share of the mass
    if o1.dtype == sd:
        # o1 + w2 (o2 - o1) = w1 o1 + w2 o2 as w1 + w2 = 1: one in-place pass over [B, H, Nq, D]
        # (each extra pass is a parallel region, which costs on a busy CPU)
        out = o1.lerp_(o2, w2)
    else:
        w1 = torch.exp(l1 - lse).unsqueeze(-1)
        out = (o1.to(sd) * w1 + o2.to(sd) * w2).to(q.dtype)
    return out.contiguous(), lse.contiguous()


@mkv_sdpa_fwd.register_fake
def _(q, k1, v1, k2, v2, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=_stat_dtype(q.dtype)
    )


@torch.library.custom_op("dcal::mkv_sdpa_bwd", mutates_args=())
def mkv_sdpa_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Optional[Tensor],
    v2: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> List[Tensor]:
    if not _finite(q, k1, v1, k2, v2, dout, dlse):
        return [_as_grad(g) for g in _exact_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale)]
    segs = _segments(k1, v1, k2, v2)
    q, out, dout = q.contiguous(), out.contiguous(), dout.contiguous()
    if dlse is not None and bool(dlse.ne(0).any()):
        # Fold the lse gradient into delta through one padded head-dim column (module docstring).
        q_, out_, dout_ = _pad_col(q), _pad_col(out, torch.ones_like(lse)), _pad_col(dout, -dlse)
        segs_ = [(_pad_col(k), _pad_col(v)) for k, v in segs]
        grads = [_seg_bwd(dout_, q_, k, v, out_, lse, scale) for k, v in segs_]
        grads = [tuple(g[..., :-_PAD] for g in gs) for gs in grads]
    else:
        grads = [_seg_bwd(dout, q, k.contiguous(), v.contiguous(), out, lse, scale) for k, v in segs]
    dq = _as_grad(grads[0][0])
    if len(grads) == 2:
        dq = dq.add_(grads[1][0])  # in place: one [B, H, Nq, D] buffer fewer at the peak
    res = [dq]
    for _, dk, dv in grads:
        res += [_as_grad(dk), _as_grad(dv)]
    return res


@mkv_sdpa_bwd.register_fake
def _(dout, dlse, q, k1, v1, k2, v2, out, lse, scale):
    res = [_grad_like(q)]
    for k, v in _segments(k1, v1, k2, v2):
        res += [_grad_like(k), _grad_like(v)]
    return res


register_mkv_autograd(mkv_sdpa_fwd, mkv_sdpa_bwd, "sdpa")


def mkv_sdpa(q, k1, v1, k2, v2, scale):
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`)."""
    return mkv_sdpa_fwd(q, k1, v1, k2, v2, float(scale))
