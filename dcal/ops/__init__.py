"""Public functional ops of dcal (docs/contract.md).

Shapes: B batch, H heads, N tokens, D head dim. Every op takes ``backend=None`` (first backend
of the op's chain that can run the call; see :func:`explain`) and ``scale=None`` (``D ** -0.5``).
Outputs have the dtype of ``q``; logsumexps are fp32 (fp64 for fp64 inputs), natural log.

Backends: ``"triton"`` (CUDA; CPU tensors only under ``TRITON_INTERPRET=1`` and when asked for),
``"cpp"`` (C++ on CPU (multi_kv: fp32/fp64/fp16; the others also bf16; fp16 computed in fp32), CUDA C++ for
neighborhood attention), ``"sdpa"`` (PyTorch fused SDPA per key/value segment, merged exactly
through the logsumexps) and ``"reference"`` (pure PyTorch, materialising; runs anywhere).
``DCAL_BACKEND`` moves a backend to the front of every chain.

Inputs (docs/inputs.md): every call passes one validation layer (:mod:`dcal.ops._validate`) before a
backend is chosen, so all backends accept the same inputs, and bad input raises a TypeError or
ValueError naming the argument before any kernel runs. Head dim: any D >= 1 on the CPU backends
(cpp, sdpa, reference); the GPU kernels (Triton, CUDA C++) take 16..128 in steps of 8 and the
chain skips them otherwise. Empty sizes (B, H, N or a map side = 0) give the empty result on
every backend without a kernel, with zero gradients. ``scale`` must be finite; ``scale = 0`` (or
one that is 0 in float32, for inputs other than float64) makes every logit 0 and q and k are not
read. NaN and inf in the inputs propagate as in the reference on every CPU backend. Outputs and
gradients are dense in the dim order of their input (out and dq like q, dk like k, dv like v).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from dcal import _ext
from dcal.kernels._common import BORDERS  # public: the border modes of neighborhood_attention2d
from dcal.ops import _validate as V
from dcal.ops import reference  # noqa: F401  (public: dcal.ops.reference)
from dcal.ops import _dispatch
from dcal.ops import _results as R
from dcal.ops._dispatch import BACKENDS, Call, choose, explain_call

HAS_EXTENSION = _ext.HAS_EXTENSION

__all__ = [
    "multi_kv_attention",
    "pwca_attention",
    "attention_rollout",
    "neighborhood_attention2d",
    "na2d",
    "explain",
    "chosen_backend",
    "BACKENDS",
    "BORDERS",
    "HAS_EXTENSION",
]


# ----------------------------------------------------------------------------- attention


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(parts):
    """Exact merge of partial attentions over disjoint key sets through their logsumexps."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, Nq]
    lse = torch.logsumexp(lses, dim=0)
    out = sum(o.to(lse.dtype) * torch.exp(l - lse)[..., None] for o, l in parts)
    return out.to(parts[0][0].dtype), lse


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
    the reference backend). With one segment this is ordinary attention.

    Accepted input (checked before any kernel; docs/inputs.md): float16/bfloat16/float32/float64
    strided tensors of one dtype on one device, any strides; head dim D >= 1 (any D on the CPU
    backends, 16..128 in steps of 8 on the GPU kernels). B, H or Nq = 0 returns the empty result
    (and zero gradients) without a kernel; a segment with Nk = 0 adds nothing; no key in any
    segment (with Nq > 0) raises. ``scale`` finite (NaN/inf raise); ``scale = 0`` does not read q
    and k (every logit is 0). On CPU, float16 runs the C++ kernels in float32 (linear memory).

    NaN and inf propagate as in PyTorch's own computation (the reference): an output or gradient
    is non-finite exactly where the reference's is, on "cpp", "reference" and "sdpa" alike
    ("sdpa" checks its inputs and computes a call that holds a NaN or inf through the exact C++
    kernels; PyTorch's fused kernel would give zeros for a NaN query row).

    ``out`` and the gradient of q are dense in q's dim order, those of each k and v in their own
    (for q, k, v views of one packed [B, N, 3, H, D] projection: [B, N, H, D] in memory, so
    ``out.transpose(1, 2).reshape(B, N, H * D)`` copies nothing); lse is contiguous.
    """
    kv, no_keys, scale = V.mkv_args(q, kv, scale, return_lse)
    B, H, Nq, D = q.shape
    scale = V.resolve_scale(scale, D)
    call = Call("multi_kv_attention", q.device, q.dtype, D, attrs={"segments": len(kv) + len(no_keys)})
    _, fn = choose(call, backend)
    if B * H * Nq == 0:  # the empty result, on every backend, without a kernel
        inputs = [q] + [t for pair in kv + no_keys for t in pair]
        out, lse = R.empty_result(
            (lambda: R.empty_in_order(q), lambda: q.new_empty((B, H, Nq), dtype=_stat_dtype(q.dtype))), inputs
        )
        return (out, lse) if return_lse else out
    unread, q0 = [], q
    if scale == 0.0:  # logits are 0 whatever q and k hold: they are not read (zero gradients)
        unread = [q] + [k for k, _ in kv]
        q, kv = R.unread(q), [(R.unread(k), v) for k, v in kv]
    qg = R.grad_in_order(q)
    kv_in = [(R.grad_in_order(k), R.grad_in_order(v)) for k, v in kv]
    # Fused backends take one or two segments per pass; more are merged exactly via lse.
    parts = []
    for i in range(0, len(kv_in), 2):
        (k1, v1), (k2, v2) = kv_in[i], (kv_in[i + 1] if i + 1 < len(kv_in) else (None, None))
        parts.append(fn(qg, k1, v1, k2, v2, scale))
    out, lse = parts[0] if len(parts) == 1 else _merge(parts)
    out = R.attach(R.in_order_of(out, q0), [t for pair in no_keys for t in pair] + unread)
    return (out, lse.contiguous()) if return_lse else out


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
    each, floating) are the blocks' logsumexps; they are recomputed when absent. Fused backends use
    O(B*H*N) memory beyond the inputs (no [N, N] matrix).

    B = 0 or N = 0 returns the empty [B, N]; H = 0 (a mean over no heads) and D = 0 raise a
    ValueError naming ``qs[0]``; integer ``lses`` a TypeError naming ``lses[i]``. ``scale = 0``
    does not read the queries and keys (every block is uniform attention).
    """
    qs, ks, lses, scale = V.rollout_args(qs, ks, lses, scale, residual)
    B, H, N, D = qs[0].shape
    scale = V.resolve_scale(scale, D)
    call = Call("attention_rollout", qs[0].device, qs[0].dtype, D, attrs={"blocks": len(qs)})
    _, fn = choose(call, backend)
    if B * N == 0:  # the empty result, on every backend, without a kernel
        return qs[0].new_empty((B, N), dtype=_stat_dtype(qs[0].dtype))
    if scale == 0.0:  # logits are 0 whatever q and k hold: they are not read
        qs, ks = [R.unread(t) for t in qs], [R.unread(t) for t in ks]
    return fn(qs, ks, lses, scale, float(residual))


# ----------------------------------------------------------------------------- neighborhood


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

    Empty maps and sizes (B, H, X or Y = 0) return the empty result (zero gradients) without a
    kernel, whatever the border; D = 0 raises. kernel_size odd in [3, 2**15), dilation in
    [1, 2**15). ``scale = 0`` does not read q and k (every logit is ``0 + rpb``). float16 on CPU
    runs the C++ kernels in float32.

    NaN and inf propagate as in PyTorch's own computation (the reference): an output is non-finite
    exactly where the reference's is, forward and backward. Exception: the Triton kernels
    multiply a query tile by its whole key halo, so a non-finite v may also reach the other
    queries of its tile, and their backward is unspecified for non-finite inputs.
    """
    q, k, v, heads_last = _to_heads_first(q, k, v, layout, kernel_size, dilation)
    ks, border, scale, dil = V.na2d_args(q, k, v, kernel_size, border, rpb, scale, dilation, BORDERS)
    scale = V.resolve_scale(scale, q.shape[-1])
    call = Call(
        "neighborhood_attention2d",
        q.device,
        q.dtype,
        q.shape[-1],
        attrs={"kernel_size": ks, "border": border, "dilation": dil},
    )
    _, fn = choose(call, backend)
    if q.numel() == 0:  # B, H, X or Y = 0 (D >= 1 is checked): the empty result, without a kernel
        (out,) = R.empty_result((lambda: R.empty_in_order(q),), [q, k, v, rpb], contiguous=(False, False, False, True))
        return _to_layout(out, heads_last)
    unread, q0 = [], q
    if scale == 0.0:  # logits are 0 (+ rpb) whatever q and k hold: they are not read (zero gradients)
        unread, q, k = [q, k], R.unread(q), R.unread(k)
    out = fn(R.grad_in_order(q), R.grad_in_order(k), R.grad_in_order(v), rpb, ks, border, scale, dil)
    return _to_layout(R.attach(R.in_order_of(out, q0), unread), heads_last)


# ----------------------------------------------------------------------------- explain


def explain(op: str, *tensors: Tensor, backend: Optional[str] = None, **attrs) -> str:
    """The backend chain for ``op`` on these tensors: which backend is chosen and why each other
    one was skipped. ``op`` is a public op name (``"pwca_attention"`` counts as
    ``"multi_kv_attention"``); pass the op's tensors themselves (the first one sets device, dtype,
    head dim): an unknown ``op`` raises a ValueError listing the names, no tensor or a list of
    tensors a TypeError naming ``tensors``, an unknown ``backend`` a ValueError listing them.

    >>> print(dcal.ops.explain("pwca_attention", q.bfloat16()))   # doctest: +SKIP
    multi_kv_attention on cpu torch.bfloat16, head dim 64:
      triton     skipped: Triton needs CUDA tensors (CPU tensors run only under TRITON_INTERPRET=1)
      cpp        skipped: dtype torch.bfloat16 not supported (float32, float64 on CPU)
      sdpa       chosen
      reference  not reached
    """
    name = V.op_name(op)
    t = V.probe_tensor(op, tensors)
    _check_backend_name(backend)
    return explain_call(Call(name, t.device, t.dtype, t.shape[-1], attrs=attrs), backend)


def _check_backend_name(backend) -> None:
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS} or None")


def chosen_backend(op: str, *tensors: Tensor, backend: Optional[str] = None) -> str:
    """Name of the backend that a call of ``op`` on these tensors would run. ``op`` and the
    tensors as for :func:`explain`; a bad ``op`` or tensor raises naming the argument."""
    name = V.op_name(op)
    t = V.probe_tensor(op, tensors)
    _check_backend_name(backend)
    return choose(Call(name, t.device, t.dtype, t.shape[-1]), backend)[0]


from dcal.ops.natten import na2d, to_heads_first as _to_heads_first, to_layout as _to_layout  # noqa: E402

_dispatch.preload()
