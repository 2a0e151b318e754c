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

The block mask is built once per shape in the provider's setup (as a user would cache it), block
by block from the mask_mod in chunks of query rows, so no [X*Y, X*Y] mask is ever materialised.
On CPU flex runs forward only (PyTorch has no CPU backward for it); on CUDA forward and backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

BORDERS = ("zero", "mask", "clamp")
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


def na_mask_mod(X: int, Y: int, kernel_size: int, border: str) -> Callable:
    """The window rule of ``border`` on flat indices: query ``i*Y + j`` of the X x Y map, keys of the
    map (mask, clamp) or of the map zero-padded by ``kernel_size // 2`` on each side (zero)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    k, r = kernel_size, kernel_size // 2
    ky_len = Y + 2 * r if border == "zero" else Y

    def mask_mod(b, h, q_idx, kv_idx):
        qx, qy = q_idx // Y, q_idx % Y
        kx, ky = kv_idx // ky_len, kv_idx % ky_len
        if border == "zero":  # padded map: the window of (qx, qy) starts at (qx, qy)
            return (kx >= qx) & (kx < qx + k) & (ky >= qy) & (ky < qy + k)
        if border == "mask":
            return ((kx - qx).abs() <= r) & ((ky - qy).abs() <= r)
        sx = (qx - r).clamp(0, X - k)
        sy = (qy - r).clamp(0, Y - k)
        return (kx >= sx) & (kx < sx + k) & (ky >= sy) & (ky < sy + k)

    return mask_mod


def kv_len(X: int, Y: int, kernel_size: int, border: str) -> int:
    r = kernel_size // 2
    return (X + 2 * r) * (Y + 2 * r) if border == "zero" else X * Y


def block_mask(mask_mod: Callable, q_len: int, kv_len_: int, device="cpu", block: int = BLOCK,
               chunk_rows: int = 2048):
    """A ``BlockMask`` (partial and full blocks) from a batch- and head-independent mask_mod,
    evaluated on ``chunk_rows`` queries at a time ([chunk_rows, kv_len] booleans at most)."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nkv = -(-q_len // block), -(-kv_len_ // block)
    chunk_rows = max(block, chunk_rows // block * block)
    any_b = torch.zeros(nq, nkv, dtype=torch.bool)
    all_b = torch.zeros(nq, nkv, dtype=torch.bool)
    kv = torch.arange(kv_len_)
    for q0 in range(0, q_len, chunk_rows):
        q1 = min(q0 + chunk_rows, q_len)
        m = mask_mod(0, 0, torch.arange(q0, q1)[:, None], kv[None, :])
        rows = -(-(q1 - q0) // block)
        padded = torch.zeros(rows * block, nkv * block, dtype=torch.bool)
        padded[: q1 - q0, :kv_len_] = m  # out-of-range positions count as masked: such blocks stay partial
        tiles = padded.view(rows, block, nkv, block)
        any_b[q0 // block: q0 // block + rows] = tiles.any(dim=3).any(dim=1)
        all_b[q0 // block: q0 // block + rows] = tiles.all(dim=3).all(dim=1)
    partial = any_b & ~all_b

    def idx(mat):
        num = mat.sum(-1).to(torch.int32)[None, None].contiguous()
        order = torch.argsort(mat.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num.to(device), order[None, None].contiguous().to(device)

    kvn, kvi = idx(partial)
    fkvn, fkvi = idx(all_b)
    return BlockMask.from_kv_blocks(kvn, kvi, fkvn, fkvi, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len_))


def na_block_mask(X: int, Y: int, kernel_size: int, border: str, device="cpu", block: int = BLOCK):
    return block_mask(na_mask_mod(X, Y, kernel_size, border), X * Y, kv_len(X, Y, kernel_size, border), device,
                      block)


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
