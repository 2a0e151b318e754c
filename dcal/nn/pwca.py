"""Drop-in ViT attention with pair-wise cross-attention (DESIGN section 5), over :mod:`dcal.ops`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal import ops


def _heads(t: Tensor, parts: int, num_heads: int):
    """[B, N, parts*C] -> ``parts`` views [B, H, N, D]."""
    B, N, _ = t.shape
    return t.view(B, N, parts, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class PWCAAttention(nn.Module):
    """timm's ViT ``Attention`` (same parameter names and shapes: ``qkv``, ``proj``, identity
    ``q_norm``/``k_norm``), so a timm state dict loads, with pair-wise cross-attention added.

    ``forward(x, pair=None, return_rollout=False, query_index=None)``, x [B, N, C]:

    - ``pair=None``: self-attention of x (one key/value segment).
    - ``pair`` [B, Np, C]: PWCA (DCAL): queries from x over the keys/values of x and of ``pair``,
      both projected with the same ``qkv`` weights; no [N, N + Np] matrix, no concatenation.
    - ``query_index`` [B, R] (int64): only those tokens of x ask queries (GLCA: CLS + top patches);
      keys/values stay all tokens. Returns [B, R, C].
    - ``return_rollout=True`` (self-attention only) also returns ``(q, k, lse)``: q, k [B, H, N, D]
      are views of the qkv projection that the attention keeps anyway, lse [B, H, N] fp32 comes
      with the fused output, so :func:`dcal.ops.attention_rollout` needs no extra memory.

    Dropout on attention probabilities (``attn_drop > 0`` in training) cannot happen inside the
    fused kernels, which never hold the probabilities. In that case the module falls back, like
    timm's non-fused path, to a materialising softmax (memory quadratic in tokens) with dropout.
    With ``attn_drop=0`` (the ViT default) or in eval the fused ops run.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check(self, x, pair, query_index, return_rollout):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, {self.dim}] (dim={self.dim}), got {got}")
        if pair is not None:
            if not isinstance(pair, Tensor) or pair.dim() != 3 or pair.shape[0] != x.shape[0] or pair.shape[-1] != self.dim:
                got = tuple(pair.shape) if isinstance(pair, Tensor) else type(pair).__name__
                raise ValueError(f"pair must be [B, Np, {self.dim}] with the batch of x {tuple(x.shape)}, got {got}")
        if query_index is not None:
            if not isinstance(query_index, Tensor) or query_index.dtype != torch.int64 or query_index.dim() != 2 \
                    or query_index.shape[0] != x.shape[0]:
                raise ValueError(f"query_index must be an int64 [B, R] tensor with B={x.shape[0]}")
            if query_index.numel() and (query_index.min() < 0 or query_index.max() >= x.shape[1]):
                raise ValueError(f"query_index values must lie in [0, {x.shape[1]})")
        if return_rollout and (pair is not None or query_index is not None):
            raise ValueError("return_rollout=True needs plain self-attention (pair=None, query_index=None)")

    def forward(self, x: Tensor, pair: Optional[Tensor] = None, return_rollout: bool = False,
                query_index: Optional[Tensor] = None):
        self._check(x, pair, query_index, return_rollout)
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        if query_index is None:
            q, k, v = _heads(self.qkv(x), 3, self.num_heads)
        else:
            # Only the chosen tokens need a query: project them with the q rows of the weight.
            xq = x.gather(1, query_index[..., None].expand(-1, -1, C))
            (q,) = _heads(F.linear(xq, w[:C], None if b is None else b[:C]), 1, self.num_heads)
            k, v = _heads(F.linear(x, w[C:], None if b is None else b[C:]), 2, self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        kv = [(k, v)]
        if pair is not None:
            # The pair only contributes keys and values: the k/v rows of the shared weight.
            k2, v2 = _heads(F.linear(pair, w[C:], None if b is None else b[C:]), 2, self.num_heads)
            kv.append((self.k_norm(k2), v2))
        if self.training and self.attn_drop.p > 0:
            out, lse = self._dropout_attention(q, kv)
        else:
            out, lse = ops.multi_kv_attention(q, kv, scale=self.scale, return_lse=True, backend=self.backend)
        y = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, q.shape[2], C)))
        return (y, (q, k, lse)) if return_rollout else y

    def _dropout_attention(self, q, kv):
        # Materialising on purpose: dropout needs the probabilities (see the class docstring).
        k = torch.cat([k for k, _ in kv], dim=2)
        v = torch.cat([v for _, v in kv], dim=2)
        s = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, Nq, Nk]
        lse = torch.logsumexp(s.to(torch.float64 if s.dtype == torch.float64 else torch.float32), dim=-1)
        return self.attn_drop(s.softmax(dim=-1)) @ v, lse

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"
