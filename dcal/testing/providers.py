"""The comparison providers of the benchmarks: what our fused ops are measured against.

Each is the plain function a peer implementation computes (``bench/`` wraps them into its
``PROVIDERS``, ``dcal.check.bench`` into its groups); :func:`step` makes the timed callable.

* :func:`naive_pwca`: PWCA as the original DCAL code writes it (concatenated keys/values,
  the [B, H, N, 2N] score matrix materialised);
* :func:`sdpa_cat_pwca`: PyTorch's fused SDPA over the concatenated keys/values;
* :func:`unfold_na`: the original BEV local attention, ``F.unfold`` of K and V (zero border),
  [B, C, X, Y] in and out;
* :func:`original_rollout`: GLCA's rollout as the original code writes it (every block's
  head-mean map kept, then multiplied).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence


def step(fn: Callable, inputs: Sequence, dout=None) -> Callable[[], object]:
    """The timed call: forward only (``dout`` None: no graph) or forward + backward to every input."""
    import torch

    inputs = list(inputs)
    if dout is None:

        def run():
            with torch.no_grad():
                return fn(*inputs)

        return run

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)

    return run


def naive_pwca(q, k1, v1, k2, v2, scale: Optional[float] = None):
    import torch

    k = torch.cat([k1, k2], dim=-2)
    v = torch.cat([v1, v2], dim=-2)
    attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [B, H, N, 2N]
    attn = attn.softmax(dim=-1)
    return attn @ v


def sdpa_cat_pwca(q, k1, v1, k2, v2, scale: Optional[float] = None):
    import torch
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, torch.cat([k1, k2], dim=-2), torch.cat([v1, v2], dim=-2), scale=scale)


def unfold_na(q, k, v, heads: int, ks: int):
    """The original local attention: [B, C, X, Y] in and out, zero padding at the border."""
    import torch.nn.functional as F

    B, C, X, Y = q.shape
    D = C // heads
    kk = F.unfold(k, ks, padding=ks // 2).view(B, heads, D, ks * ks, X * Y)
    vv = F.unfold(v, ks, padding=ks // 2).view(B, heads, D, ks * ks, X * Y)
    qq = q.reshape(B, heads, D, 1, X * Y)
    attn = (qq * kk).sum(dim=2, keepdim=True) * D**-0.5  # [B, heads, 1, ks*ks, X*Y]
    attn = attn.softmax(dim=3)
    out = (attn * vv).sum(dim=3)  # [B, heads, D, X*Y]
    return out.reshape(B, C, X, Y)


def original_rollout(qs, ks, residual: float = 0.5):
    """GLCA as the original DCAL code writes it: keep every block's head-mean map, then multiply them."""
    import torch

    maps = []
    for q, k in zip(qs, ks):
        a = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1).mean(1)
        maps.append(a)
    eye = torch.eye(maps[0].shape[-1], device=maps[0].device)
    prod = None
    for a in maps:
        s = (1 - residual) * a + residual * eye
        prod = s if prod is None else s @ prod
    return prod[:, 0]


__all__ = ["naive_pwca", "original_rollout", "sdpa_cat_pwca", "step", "unfold_na"]
