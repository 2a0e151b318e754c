"""Public functional ops of dcal (docs/contract.md).

Shapes: B batch, H heads, N tokens, D head dim. Every op takes ``backend=None`` (first backend
of the op's chain that can run the call; see :func:`explain`) and ``scale=None`` (``D ** -0.5``).
Outputs have the dtype of ``q``; logsumexps are fp32 (fp64 for fp64 inputs), natural log.

Backends: ``"triton"`` (CUDA; CPU tensors only under ``TRITON_INTERPRET=1`` and when asked for),
``"cpp"`` (C++ on CPU (multi_kv: fp32/fp64), CUDA C++ for neighborhood attention), ``"sdpa"`` (PyTorch fused SDPA per
key/value segment, merged exactly through the logsumexps) and ``"reference"`` (pure PyTorch,
materialising; runs anywhere). ``DCAL_BACKEND`` moves a backend to the front of every chain.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from dcal import _ext
from dcal.ops import _validate as V
from dcal.ops import reference  # noqa: F401  (public: dcal.ops.reference)
from dcal.ops import _dispatch
from dcal.ops._dispatch import BACKENDS, Call, choose, explain_call

HAS_EXTENSION = _ext.HAS_EXTENSION
BORDERS = ("zero", "mask", "clamp")

__all__ = [
    "multi_kv_attention",
    "pwca_attention",
    "attention_rollout",
    "neighborhood_attention2d",
    "na2d",
    "explain",
    "BACKENDS",
    "BORDERS",
    "HAS_EXTENSION",
]


# ----------------------------------------------------------------------------- attention


def _merge(parts):
    """Exact merge of partial attentions over disjoint key sets through their logsumexps."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, Nq]
    lse = torch.logsumexp(lses, dim=0)
    out = sum(o.to(lse.dtype) * torch.exp(l - lse)[..., None] for o, l in parts)
    return out.to(parts[0][0].dtype), lse


def _mkv_call(q, kv, scale, backend):
    V.tensor("q", q, 4, "[B, H, Nq, D]")
    kv = V.segments(q, kv)
    scale = V.scale(scale)
    call = Call("multi_kv_attention", q.device, q.dtype, q.shape[-1], attrs={"segments": len(kv)})
    return kv, (q.shape[-1] ** -0.5 if scale is None else scale), call


def multi_kv_attention(
    q: Tensor,
    kv: Sequence[Tuple[Tensor, Tensor]],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention of ``q`` over the concatenation of several key/value segments, fused.

    Args:
        q: [B, H, Nq, D] queries.
        kv: sequence of ``(k_i, v_i)``, each [B, H, Nk_i, D] (segments may differ in length).
        scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the logsumexp over all keys, [B, H, Nq] fp32.
        backend: None (automatic), "triton", "cpp", "sdpa" or "reference".

    Returns ``softmax(q @ K^T * scale) @ V`` with ``K = cat(k_i)``, ``V = cat(v_i)`` along the
    token axis, computed without concatenating and without an [Nq, sum Nk_i] matrix (except by
    the reference backend). With one segment this is ordinary attention. NaN and inf propagate as
    in PyTorch's attention: an output or gradient is non-finite exactly where the reference's is.
    """
    kv, scale, call = _mkv_call(q, kv, scale, backend)
    _, fn = choose(call, backend)
    # Fused backends take one or two segments per pass; more are merged exactly via lse.
    parts = []
    for i in range(0, len(kv), 2):
        (k1, v1), (k2, v2) = kv[i], (kv[i + 1] if i + 1 < len(kv) else (None, None))
        parts.append(fn(q, k1, v1, k2, v2, scale))
    out, lse = parts[0] if len(parts) == 1 else _merge(parts)
    return (out, lse) if return_lse else out


def pwca_attention(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Pair-wise cross-attention (DCAL): queries of the target image over the keys/values of the
    target (``k1``, ``v1``) and of the paired image (``k2``, ``v2``), all [B, H, N, D].

    Same as ``multi_kv_attention(q, [(k1, v1), (k2, v2)])``; the [B, H, N, 2N] score matrix and
    the concatenated keys are never built.
    """
    return multi_kv_attention(q, [(k1, v1), (k2, v2)], scale=scale, return_lse=return_lse, backend=backend)


# ----------------------------------------------------------------------------- rollout


def _rollout_call(qs, ks, lses, residual):
    if isinstance(qs, Tensor) or isinstance(ks, Tensor):
        raise TypeError("qs and ks must be sequences of [B, H, N, D] tensors (one per SA block)")
    qs, ks = list(qs), list(ks)
    if len(qs) == 0:
        raise ValueError("qs must hold at least one [B, H, N, D] tensor")
    if len(qs) != len(ks):
        raise ValueError(f"qs has {len(qs)} tensors but ks has {len(ks)}; expected one k per q")
    ref = qs[0]
    V.tensor("qs[0]", ref, 4, "[B, H, N, D]")
    for name, seq in (("qs", qs), ("ks", ks)):
        for i, t in enumerate(seq):
            V.tensor(f"{name}[{i}]", t, 4, "[B, H, N, D]")
            V.same_kind("qs[0]", ref, f"{name}[{i}]", t)
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; expected {tuple(ref.shape)} like qs[0]")
    if lses is not None:
        lses = list(lses)
        if len(lses) != len(qs):
            raise ValueError(f"lses has {len(lses)} tensors but qs has {len(qs)}; expected one per block or None")
        for i, t in enumerate(lses):
            if not isinstance(t, Tensor) or t.shape != ref.shape[:3]:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"lses[{i}] must be a [B, H, N] tensor {tuple(ref.shape[:3])}, got {shape}")
            if t.device != ref.device:
                raise ValueError(f"lses[{i}] is on {t.device} but qs[0] is on {ref.device}")
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be a float in [0, 1], got {residual!r}")
    return qs, ks, lses


@torch.no_grad()
def attention_rollout(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    *,
    scale: Optional[float] = None,
    lses: Optional[Sequence[Tensor]] = None,
    residual: float = 0.5,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention rollout of L self-attention blocks, CLS row only, without attention maps.

    With ``A_l = mean_h softmax(q_l k_l^T * scale)`` and ``S_l = (1 - residual) A_l + residual I``,
    returns row 0 of ``S_L @ ... @ S_1``: [B, N], fp32, no grad. ``lses`` (optional, [B, H, N]
    each) are the blocks' logsumexps; they are recomputed when absent. Fused backends use
    O(B*H*N) memory beyond the inputs (no [N, N] matrix).
    """
    qs, ks, lses = _rollout_call(qs, ks, lses, residual)
    scale = V.scale(scale)
    scale = qs[0].shape[-1] ** -0.5 if scale is None else scale
    call = Call("attention_rollout", qs[0].device, qs[0].dtype, qs[0].shape[-1], attrs={"blocks": len(qs)})
    _, fn = choose(call, backend)
    return fn(qs, ks, lses, scale, float(residual))


# ----------------------------------------------------------------------------- neighborhood


def _na2d_call(q, k, v, kernel_size, border, rpb, scale, dilation):
    V.tensor("q", q, 5, "[B, H, X, Y, D]")
    V.tensor("k", k, 5, "[B, H, X, Y, D]")
    V.tensor("v", v, 5, "[B, H, X, Y, D]")
    V.same_kind("q", q, "k", k)
    V.same_kind("q", q, "v", v)
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected the shape of q {tuple(q.shape)} [B, H, X, Y, D]")
    if v.shape != q.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected the shape of q {tuple(q.shape)} [B, H, X, Y, D]")
    ks = V.kernel_size(kernel_size)
    border = V.border(border, BORDERS)
    dil = V.dilation(dilation)
    B, H, X, Y, D = q.shape
    if min(X, Y) < 1:
        raise ValueError(f"q has an empty map (shape {tuple(q.shape)}); X and Y must be >= 1")
    if border == "clamp" and (X < ks * dil or Y < ks * dil):
        raise ValueError(
            f"border='clamp' needs a map of at least kernel_size*dilation x kernel_size*dilation "
            f"({ks * dil}x{ks * dil}: kernel_size {ks}, dilation {dil}), got {X}x{Y}; "
            "use border='zero' or 'mask' for smaller maps")
    if rpb is not None:
        if not isinstance(rpb, Tensor):
            raise TypeError(f"rpb must be a tensor [H, 2*kernel_size-1, 2*kernel_size-1] or None, got {type(rpb).__name__}")
        want = (H, 2 * ks - 1, 2 * ks - 1)
        if tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape {want} ([H, 2*kernel_size-1, 2*kernel_size-1]), got {tuple(rpb.shape)}")
        V.same_kind("q", q, "rpb", rpb)
    scale = V.scale(scale)
    return ks, border, (D ** -0.5 if scale is None else scale), dil


def neighborhood_attention2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: int = 7,
    border: str = "zero",
    rpb: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dilation: int = 1,
    backend: Optional[str] = None,
    layout: Optional[str] = None,
) -> Tensor:
    """2-D neighborhood attention: every pixel attends to the kernel_size x kernel_size window
    around it. Exact, fused: no unfold, no tensor with a kernel_size**2 factor.

    Args:
        q, k, v: [B, H, X, Y, D] (X, Y: the map's height and width).
        kernel_size: odd, >= 3.
        border: what the window does at the map's edge (r = kernel_size // 2)::

            "zero"   centred; off-map keys/values are zeros and stay in the softmax
                     (logit 0 + rpb), exactly F.pad(0) + F.unfold
                        . . . . .
                        . 0 0 0 .      query at the corner: the 3x3 window holds
                        . 0 q k .      5 zero keys and 4 real ones
                        . 0 k k .
            "mask"   centred; off-map positions are left out of the softmax
            "clamp"  NATTEN: the window shifts inside the map, so each query sees exactly
                     kernel_size**2 real pixels; needs X, Y >= kernel_size
                        q k k .        the corner query's window is the 3x3 block
                        k k k .        starting at the corner
                        k k k .

        rpb: optional relative position bias [H, 2*kernel_size-1, 2*kernel_size-1]; the logit of
            key (i+di, j+dj) for query (i, j) gets ``rpb[h, di + kernel_size - 1, dj + kernel_size - 1]``.
        scale: default ``D ** -0.5``.
        dilation: window step (DiNAT / NATTEN): the window holds positions ``start + dilation * u``,
            u in [0, kernel_size). zero/mask: centred like ``F.unfold(dilation=d, padding=d * (k // 2))``;
            clamp: NATTEN's rule (the map splits into ``dilation`` interleaved sub-grids per axis,
            each with its ordinary clamp window; needs X, Y >= kernel_size * dilation). rpb is
            indexed by the offset in window steps, ``(key - query) / dilation``.
        layout: ``"heads_first"`` (q, k, v and the output are [B, H, X, Y, D]; the default, also
            for None) or ``"heads_last"`` (NATTEN's [B, X, Y, H, D] in and out, through permuted
            views: no copy). With None, a q whose map width is smaller than the window while its
            head count is not (what heads-last tensors look like when read as heads-first) gets
            a warning; see :mod:`dcal.ops.natten`, and :func:`na2d` for NATTEN's functional API.

    Returns [B, H, X, Y, D] in the dtype of q, laid out in q's dim order: a dense tensor whose
    dims lie in memory by decreasing stride of q (ties in logical order), so for q a view of
    heads-last [B, X, Y, H, D], of a channels-first [B, C, X, Y] map or of a fused qkv projection,
    the output is a view of the same layout (e.g. ``out.permute(0, 1, 4, 2, 3).reshape(B, C, X, Y)``
    copies nothing). The gradients of q, k and v take the dim order of q, k and v; every backend
    follows this rule.

    NaN and inf propagate as in PyTorch's own computation (the reference): an output is non-finite
    exactly where the reference's is, forward and backward. Exception: the Triton kernels
    multiply a query tile by its whole key halo, so a non-finite v may also reach the other
    queries of its tile, and their backward is unspecified for non-finite inputs.
    """
    q, k, v, heads_last = _to_heads_first(q, k, v, layout, kernel_size, dilation)
    ks, border, scale, dil = _na2d_call(q, k, v, kernel_size, border, rpb, scale, dilation)
    call = Call("neighborhood_attention2d", q.device, q.dtype, q.shape[-1],
                attrs={"kernel_size": ks, "border": border, "dilation": dil})
    _, fn = choose(call, backend)
    return _to_layout(fn(q, k, v, rpb, ks, border, scale, dil), heads_last)


# ----------------------------------------------------------------------------- explain


def explain(op: str, *tensors: Tensor, backend: Optional[str] = None, **attrs) -> str:
    """The backend chain for ``op`` on these tensors: which backend is chosen and why each other
    one was skipped. ``op`` is a public op name (``"pwca_attention"`` counts as
    ``"multi_kv_attention"``); pass the op's tensors (the first one sets device, dtype, head dim).

    >>> print(dcal.ops.explain("pwca_attention", q.bfloat16()))   # doctest: +SKIP
    multi_kv_attention on cpu torch.bfloat16, head dim 64:
      triton     skipped: Triton needs CUDA tensors (CPU tensors run only under TRITON_INTERPRET=1)
      cpp        skipped: dtype torch.bfloat16 not supported (float32, float64 on CPU)
      sdpa       chosen
      reference  not reached
    """
    name = "multi_kv_attention" if op == "pwca_attention" else op
    if name not in ("multi_kv_attention", "neighborhood_attention2d", "attention_rollout"):
        raise ValueError(f"op must be one of multi_kv_attention, pwca_attention, attention_rollout, "
                         f"neighborhood_attention2d; got {op!r}")
    if not tensors or not isinstance(tensors[0], Tensor):
        raise TypeError("explain needs at least one tensor of the op (e.g. q)")
    t = tensors[0]
    return explain_call(Call(name, t.device, t.dtype, t.shape[-1], attrs=attrs), backend)


def chosen_backend(op: str, *tensors: Tensor, backend: Optional[str] = None) -> str:
    """Name of the backend that a call of ``op`` on these tensors would run."""
    name = "multi_kv_attention" if op == "pwca_attention" else op
    t = tensors[0]
    return choose(Call(name, t.device, t.dtype, t.shape[-1]), backend)[0]


from dcal.ops.natten import na2d, to_heads_first as _to_heads_first, to_layout as _to_layout  # noqa: E402

_dispatch.preload()
