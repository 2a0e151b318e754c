"""``nn.MultiheadAttention`` (self- and cross-attention, no weights returned) over :mod:`dcal.ops`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal import ops
from dcal.nn.pwca import _check_mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """MHA's convention (bool: True is left out; float: added) -> an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class FusedMultiheadAttention(nn.Module):
    """PyTorch's ``nn.MultiheadAttention`` with the same parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``) and call, computed by :func:`dcal.ops.multi_kv_attention`.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(out, None)``. The fused kernels never
    hold the attention probabilities, so ``need_weights=True`` (MHA's default) raises: call it with
    ``need_weights=False``, as torchvision's ViT and ``nn.TransformerEncoderLayer`` do.
    ``attn_mask`` ([L, S] or [B*H, L, S]) and ``key_padding_mask`` ([B, S]) keep MHA's meaning
    (bool: True is left out; float: added to the logits) and, like attention dropout in training,
    run on PyTorch's ``F.scaled_dot_product_attention`` (memory-efficient on GPU, materialising on
    CPU). ``is_causal`` is MHA's hint that ``attn_mask`` is the causal mask: it needs ``attn_mask``.
    Not supported (refused when converting): ``kdim``/``vdim`` != ``embed_dim``, ``add_bias_kv``,
    ``add_zero_attn``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, backend
        self._qkv_same_embed_dim = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **dd)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **dd)
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, backend: Optional[str] = None) -> "FusedMultiheadAttention":
        """The fused module sharing ``mha``'s parameter tensors (no copy)."""
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                f"nn.MultiheadAttention with kdim={mha.kdim} / vdim={mha.vdim} != embed_dim="
                f"{mha.embed_dim} (separate q/k/v projections) is not supported"
            )
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True is not supported")
        if mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_zero_attn=True is not supported")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device="meta",
            backend=backend,
        )
        new.in_proj_weight, new.in_proj_bias, new.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        new.train(mha.training)
        return new

    def _project(self, query, key, value):
        E, H = self.embed_dim, self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            return _split(F.linear(query, w, b), 3, H)
        bs = (None, None, None) if b is None else b.split(E)
        return tuple(_split(F.linear(t, wi, bi), 1, H)[0] for t, wi, bi in zip((query, key, value), w.split(E), bs))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, None]:
        if need_weights:
            raise ValueError(
                "need_weights=True: the fused attention never holds the attention weights; call with need_weights=False"
            )
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must be batched and 3-D with {self.embed_dim} features "
                    f"({'[B, L, E]' if self.batch_first else '[L, B, E]'}), got {got}"
                )
        if not self.batch_first:  # keep self-attention recognisable: one transposed tensor, one projection
            qk, kv = query is key, key is value
            query = query.transpose(0, 1)
            key = query if qk else key.transpose(0, 1)
            value = key if kv else value.transpose(0, 1)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(
                f"key and value must share batch and length with query's batch {B}: "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too")
        q, k, v = self._project(query, key, value)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3 and attn_mask.shape[0] == B * self.num_heads:
                attn_mask = attn_mask.view(B, self.num_heads, L, S)
            _check_mask(attn_mask, (B, self.num_heads, L, S), "attn_mask", "[L, S] or [B*H, L, S]")
            mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            _check_mask(key_padding_mask, (B, S), "key_padding_mask", "[B, S]")
            kpm = _additive(key_padding_mask.expand(B, S), q.dtype).view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        dropout = self.dropout if self.training else 0.0
        if mask is not None or dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            out = ops.multi_kv_attention(q, [(k, v)], backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"backend={self.backend!r}"
        )


def _split(t: Tensor, parts: int, num_heads: int):
    B, N, _ = t.shape
    return t.view(B, N, parts, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
