"""FlexAttention peers: neighborhood windows of each border mode as mask_mods and block masks, and
PWCA over the concatenated keys/values, through compiled ``torch.nn.attention.flex_attention``.

Flex attends a flat token sequence, so a [B, H, X, Y, D] map becomes [B, H, X*Y, D] (row-major)
and the window rule becomes a ``mask_mod`` on the flat indices:

* ``mask``: keys within ``k // 2`` of the query on both axes (off-map positions simply absent);
* ``clamp``: NATTEN's rule, the window shifted inside the map (start ``clamp(i - k//2, 0, X - k)``);
* ``zero``: off-map positions must stay in the softmax as keys and values of zeros (logit 0),
  which a mask over the map's own tokens cannot express: the keys and values are zero-padded by
  ``k // 2`` (``F.pad``, two copies of k and v, 1.1x their size at 128x128) and the window is taken
  in the padded map, where it never leaves it.

The block mask is built once per shape in the provider's setup (as a user would cache it), counted
from the two one-axis window rules (:func:`na_block_mask`), so no [X*Y, X*Y] mask is ever
materialised; :func:`block_mask` builds one from any mask_mod, chunk by chunk (the tests check
that both agree).
On CPU flex runs forward only (PyTorch has no CPU backward for it); on CUDA forward and backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dcal.kernels._common import BORDERS

BLOCK = 128


def unavailable_reason(device: str, mode: str) -> Optional[str]:
    """Why the compiled FlexAttention peer cannot run this (device, mode) here; None if it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention unavailable: {e}"
    if mode != "fwd" and not device.startswith("cuda"):
        return "FlexAttention has no CPU backward (forward only on CPU)"
    return None


def _axis_rule(qi, ki, n: int, k: int, border: str):
    """Whether key coordinate ``ki`` lies in the window of query coordinate ``qi`` on one axis of
    length ``n`` (zero: ``ki`` in the axis padded by k // 2 on both sides)."""
    r = k // 2
    if border == "zero":  # padded axis: the window of qi starts at qi
        return (ki >= qi) & (ki < qi + k)
    if border == "mask":
        return (ki - qi).abs() <= r
    s = (qi - r).clamp(0, n - k)
    return (ki >= s) & (ki < s + k)


def na_mask_mod(X: int, Y: int, kernel_size: int, border: str) -> Callable:
    """The window rule of ``border`` on flat indices: query ``i*Y + j`` of the X x Y map, keys of the
    map (mask, clamp) or of the map zero-padded by ``kernel_size // 2`` on each side (zero)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    k = kernel_size
    ky_len = Y + 2 * (k // 2) if border == "zero" else Y

    def mask_mod(b, h, q_idx, kv_idx):
        qx, qy = q_idx // Y, q_idx % Y
        kx, ky = kv_idx // ky_len, kv_idx % ky_len
        return _axis_rule(qx, kx, X, k, border) & _axis_rule(qy, ky, Y, k, border)

    return mask_mod


def kv_len(X: int, Y: int, kernel_size: int, border: str) -> int:
    r = kernel_size // 2
    return (X + 2 * r) * (Y + 2 * r) if border == "zero" else X * Y


def block_mask(
    mask_mod: Callable,
    q_len: int,
    kv_len_: int,
    device="cpu",
    block: int = BLOCK,
    chunk_rows: int = 4096,
    kv_span: Optional[Callable] = None,
):
    """A ``BlockMask`` (partial and full blocks) from a batch- and head-independent mask_mod,
    evaluated on ``chunk_rows`` queries at a time. ``kv_span(q0, q1) -> (lo, hi)``: the keys the
    queries q0..q1-1 can see lie in [lo, hi) (default: all), so only that band is evaluated."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nkv = -(-q_len // block), -(-kv_len_ // block)
    chunk_rows = max(block, chunk_rows // block * block)
    any_b = torch.zeros(nq, nkv, dtype=torch.bool)
    all_b = torch.zeros(nq, nkv, dtype=torch.bool)
    for q0 in range(0, q_len, chunk_rows):
        q1 = min(q0 + chunk_rows, q_len)
        lo, hi = kv_span(q0, q1) if kv_span else (0, kv_len_)
        b_lo, b_hi = max(0, lo) // block, min(nkv, -(-min(hi, kv_len_) // block))
        kv = torch.arange(b_lo * block, min(b_hi * block, kv_len_), dtype=torch.int32)
        m = mask_mod(0, 0, torch.arange(q0, q1, dtype=torch.int32)[:, None], kv[None, :])
        rows = -(-(q1 - q0) // block)
        padded = torch.zeros(rows * block, (b_hi - b_lo) * block, dtype=torch.bool)
        padded[: q1 - q0, : kv.numel()] = m  # out-of-range positions count as masked: such blocks stay partial
        tiles = padded.view(rows, block, b_hi - b_lo, block)
        any_b[q0 // block : q0 // block + rows, b_lo:b_hi] = tiles.any(dim=3).any(dim=1)
        all_b[q0 // block : q0 // block + rows, b_lo:b_hi] = tiles.all(dim=3).all(dim=1)
    partial = any_b & ~all_b

    def idx(mat):
        num = mat.sum(-1).to(torch.int32)[None, None].contiguous()
        order = torch.argsort(mat.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num.to(device), order[None, None].contiguous().to(device)

    kvn, kvi = idx(partial)
    fkvn, fkvi = idx(all_b)
    return BlockMask.from_kv_blocks(
        kvn, kvi, fkvn, fkvi, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(q_len, kv_len_)
    )


def _segments(n_flat: int, width: int, block: int):
    """Each block of ``block`` flat indices of a grid ``width`` wide as row segments: (row, start,
    end, valid), each [n_blocks, S] with S the most rows a block touches."""
    nb = -(-n_flat // block)
    f0 = torch.arange(nb) * block
    f1 = torch.clamp(f0 + block, max=n_flat)
    S = block // width + 2
    row = (f0 // width)[:, None] + torch.arange(S)[None, :]
    start = torch.maximum(f0[:, None], row * width) - row * width
    end = torch.minimum(f1[:, None], (row + 1) * width) - row * width
    valid = end > start
    return row, start.clamp(0, width), end.clamp(0, width), valid


def na_block_mask(X: int, Y: int, kernel_size: int, border: str, device="cpu", block: int = BLOCK):
    """The block mask of :func:`na_mask_mod`, counted exactly from the two one-axis window rules
    (the window is a product of an x rule and a y rule): for every (query block, key block) the
    number of allowed pairs is a sum over their row segments of x-rule x (y-rule pairs, from a
    prefix sum); blocks with some allowed pairs are visited, those with all allowed are full."""
    from torch.nn.attention.flex_attention import BlockMask

    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    k = kernel_size
    rows_kv = X + 2 * (k // 2) if border == "zero" else X
    cols_kv = Y + 2 * (k // 2) if border == "zero" else Y
    n_q, n_kv = X * Y, rows_kv * cols_kv
    rx = _axis_rule(torch.arange(X)[:, None], torch.arange(rows_kv)[None, :], X, k, border).long()  # [X, Xk]
    ry = _axis_rule(torch.arange(Y)[:, None], torch.arange(cols_kv)[None, :], Y, k, border).long()  # [Y, Yk]
    pre = torch.zeros(Y + 1, cols_kv + 1, dtype=torch.long)
    pre[1:, 1:] = ry.cumsum(0).cumsum(1)
    qr, qa, qb, qv = (t[:, :, None, None] for t in _segments(n_q, Y, block))  # [nq, S, 1, 1]
    kr, kc, kd, kv = (t[None, None] for t in _segments(n_kv, cols_kv, block))  # [1, 1, nkv, T]
    y_pairs = pre[qb, kd] - pre[qa, kd] - pre[qb, kc] + pre[qa, kc]
    x_ok = rx[qr.clamp(max=X - 1), kr.clamp(max=rows_kv - 1)]
    count = (x_ok * y_pairs * (qv & kv)).sum(dim=(1, 3))  # [nq, nkv] allowed pairs per block pair
    full = count == block * block
    partial = (count > 0) & ~full

    def idx(mat):
        num = mat.sum(-1).to(torch.int32)[None, None].contiguous()
        order = torch.argsort(mat.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num.to(device), order[None, None].contiguous().to(device)

    kvn, kvi = idx(partial)
    fkvn, fkvi = idx(full)
    return BlockMask.from_kv_blocks(
        kvn, kvi, fkvn, fkvi, BLOCK_SIZE=block, mask_mod=na_mask_mod(X, Y, k, border), seq_lengths=(n_q, n_kv)
    )


def flex_fn(compiled: bool = True):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_neighborhood(q, k, v, kernel_size: int, border: str, bmask, attend: Callable):
    """Neighborhood attention of [B, H, X, Y, D] tensors through ``attend`` (flex_attention, compiled
    or not) with ``bmask`` from :func:`na_block_mask`; returns [B, H, X, Y, D]."""
    B, H, X, Y, D = q.shape
    r = kernel_size // 2
    if border == "zero":
        # zero keys/values around the map: logit 0 and value 0, as F.pad + F.unfold
        k = F.pad(k, (0, 0, r, r, r, r))
        v = F.pad(v, (0, 0, r, r, r, r))
    flat = lambda t: t.reshape(B, H, -1, D)  # noqa: E731
    out = attend(flat(q), flat(k), flat(v), block_mask=bmask)
    return out.view(B, H, X, Y, D)


def flex_concat(q, k1, v1, k2, v2, attend: Callable):
    """PWCA through flex_attention over ``torch.cat`` of the two segments (no mask)."""
    return attend(q, torch.cat([k1, k2], dim=-2), torch.cat([v1, v2], dim=-2))
