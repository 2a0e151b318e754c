"""Pure-PyTorch, materialising definitions of every dcal op (docs/contract.md).

This is the truth that tests compare kernels against and the backend of last resort. It builds
the score matrices, the ``torch.cat`` of key/value segments and the windows of neighborhood
attention, so its memory is quadratic (or ``kernel_size**2``-fold); use it on small shapes.

Computation happens in the dtype of the inputs (so the reference run in fp16 shows PyTorch's own
fp16 error); logsumexps are returned in fp32, or fp64 for fp64 inputs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(scale: Optional[float], head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- attention


def multi_kv_attention(
    q: Tensor,
    kv: Sequence[Tuple[Tensor, Tensor]],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """softmax(q @ cat(k_i)^T * scale) @ cat(v_i): q [B, H, Nq, D], each k_i, v_i [B, H, Nk_i, D]."""
    scale = _scale(scale, q.shape[-1])
    k = torch.cat([k for k, _ in kv], dim=-2)
    v = torch.cat([v for _, v in kv], dim=-2)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    lse = torch.logsumexp(s.to(_stat_dtype(q.dtype)), dim=-1)  # [B, H, Nq]
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v)
    return (out, lse) if return_lse else out


def pwca_attention(q, k1, v1, k2, v2, *, scale=None, return_lse=False):
    """Pair-wise cross-attention: ``multi_kv_attention(q, [(k1, v1), (k2, v2)])``."""
    return multi_kv_attention(q, [(k1, v1), (k2, v2)], scale=scale, return_lse=return_lse)


# ----------------------------------------------------------------------------- rollout


@torch.no_grad()
def attention_rollout(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    *,
    scale: Optional[float] = None,
    lses: Optional[Sequence[Tensor]] = None,
    residual: float = 0.5,
) -> Tensor:
    """CLS row of ``S_L @ ... @ S_1`` with ``S_l = (1 - residual) * mean_h softmax(q_l k_l^T) + residual * I``.

    Dense: builds every [B, N, N] matrix. Returns [B, N] in fp32 (fp64 for fp64 inputs).
    """
    dtype = _stat_dtype(qs[0].dtype)
    scale = _scale(scale, qs[0].shape[-1])
    B, H, N, _ = qs[0].shape
    eye = torch.eye(N, dtype=dtype, device=qs[0].device)
    prod = None
    for l, (q, k) in enumerate(zip(qs, ks)):
        s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # [B, H, N, N]
        if lses is not None:
            a = torch.exp(s - lses[l].to(dtype)[..., None])
        else:
            a = torch.softmax(s, dim=-1)
        S = (1.0 - residual) * a.mean(dim=1) + residual * eye  # [B, N, N]
        prod = S if prod is None else torch.matmul(S, prod)  # S_l @ (S_{l-1} @ ... @ S_1)
    return prod[:, 0, :].contiguous()


# ----------------------------------------------------------------------------- neighborhood


def _window_index(n: int, kernel_size: int, border: str, device, dilation: int = 1) -> Tuple[Tensor, Tensor]:
    """For each of n query positions, the kernel_size key positions of its window and whether
    each lies on the map. Positions are real coordinates; off-map ones are outside [0, n).

    Windows are ``start + dilation * u``, u in [0, kernel_size). zero/mask: centred on the query
    (a dilated F.unfold with padding ``dilation * (kernel_size // 2)``). clamp: NATTEN's rule, the
    ordinary clamp window of the query's own sub-grid (positions of one residue mod dilation)."""
    r = kernel_size // 2
    i = torch.arange(n, device=device)
    if border == "clamp":
        g = i % dilation  # the query's sub-grid
        ng = torch.div(n - g + dilation - 1, dilation, rounding_mode="floor")  # its length
        s = torch.minimum((torch.div(i, dilation, rounding_mode="floor") - r).clamp(min=0), ng - kernel_size)
        start = g + dilation * s
    else:
        start = i - dilation * r
    pos = start[:, None] + dilation * torch.arange(kernel_size, device=device)[None, :]  # [n, ks]
    valid = (pos >= 0) & (pos < n)
    return pos, valid


def neighborhood_attention2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: int = 7,
    border: str = "zero",
    rpb: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    dilation: int = 1,
):
    """2-D neighborhood attention on [B, H, X, Y, D] (see :func:`dcal.ops.neighborhood_attention2d`).

    Materialises the [B, H, X, Y, kernel_size, kernel_size, D] windows of k and v.
    """
    B, H, X, Y, D = q.shape
    scale = _scale(scale, D)
    ks = kernel_size
    rows, rvalid = _window_index(X, ks, border, q.device, dilation)  # [X, ks]
    cols, cvalid = _window_index(Y, ks, border, q.device, dilation)  # [Y, ks]
    # Off-map positions index a zero row/column appended at the end (index X or Y).
    ri = torch.where(rvalid, rows, torch.full_like(rows, X))
    ci = torch.where(cvalid, cols, torch.full_like(cols, Y))
    kp = torch.nn.functional.pad(k, (0, 0, 0, 1, 0, 1))  # [B, H, X+1, Y+1, D]
    vp = torch.nn.functional.pad(v, (0, 0, 0, 1, 0, 1))
    kw = kp[:, :, ri[:, None, :, None], ci[None, :, None, :], :]  # [B, H, X, Y, ks, ks, D]
    vw = vp[:, :, ri[:, None, :, None], ci[None, :, None, :], :]
    logits = torch.einsum("bhxyd,bhxyuwd->bhxyuw", q, kw) * scale  # [B, H, X, Y, ks, ks]
    if rpb is not None:
        # offsets in window steps: (key - query) / dilation, exact (same residue mod dilation)
        di = torch.div(rows - torch.arange(X, device=q.device)[:, None], dilation, rounding_mode="floor") + ks - 1
        dj = torch.div(cols - torch.arange(Y, device=q.device)[:, None], dilation, rounding_mode="floor") + ks - 1
        bias = rpb[:, di[:, None, :, None], dj[None, :, None, :]]  # [H, X, Y, ks, ks]
        logits = logits + bias[None].to(logits.dtype)
    if border == "mask":
        valid = rvalid[:, None, :, None] & cvalid[None, :, None, :]  # [X, Y, ks, ks]
        logits = logits.masked_fill(~valid, float("-inf"))
    flat = logits.flatten(-2)  # [B, H, X, Y, ks*ks]
    p = torch.softmax(flat, dim=-1).view_as(logits)
    out = torch.einsum("bhxyuw,bhxyuwd->bhxyd", p, vw)
    if return_lse:
        return out, torch.logsumexp(flat.to(_stat_dtype(q.dtype)), dim=-1)
    return out
