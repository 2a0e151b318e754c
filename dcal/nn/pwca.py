"""Drop-in ViT attention with pair-wise cross-attention (docs/contract.md, Modules), over :mod:`dcal.ops`."""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal import ops


def _heads(t: Tensor, parts: int, num_heads: int):
    """[B, N, parts*H*D] -> ``parts`` views [B, H, N, D]."""
    B, N, _ = t.shape
    return t.view(B, N, parts, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _check_mask(attn_mask, want: tuple, name: str = "attn_mask", layout: str = "[B, H, Nq, Nk]") -> None:
    if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        got = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise ValueError(f"{name} must be a bool or floating tensor, got {got}")
    try:
        ok = attn_mask.dim() <= len(want) and torch.broadcast_shapes(attn_mask.shape, want) == torch.Size(want)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to {layout} = {list(want)}, got {list(attn_mask.shape)}")


class PWCAAttention(nn.Module):
    """timm's ViT ``Attention`` (same constructor, parameter names, forward and results) with
    pair-wise cross-attention added, over the fused ops of :mod:`dcal.ops`.

    Constructor: timm 1.0's ``Attention(dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm,
    scale_norm, proj_bias, gated, attn_drop, proj_drop, norm_layer, device, dtype)``; positionally
    only ``(dim, num_heads, qkv_bias, attn_drop, proj_drop, backend)`` (docs/contract.md, Modules), the rest by
    keyword, as timm's blocks pass them. A timm state dict loads strictly; :func:`dcal.nn.fuse_attention`
    swaps a whole model's attention, keeping its parameter tensors.

    ``forward(x, attn_mask=None, is_causal=False, *, pair=None, return_rollout=False, query_index=None,
    pair_kv=None, return_kv=False)``, x [B, N, dim]:

    - ``pair=None``: self-attention of x (one key/value segment).
    - ``pair`` [B, Np, dim]: PWCA (DCAL): queries from x over the keys/values of x and of ``pair``,
      both projected with the same ``qkv`` weights; no [N, N + Np] matrix, no concatenation.
    - ``query_index`` [B, R] (int64): only those tokens of x ask queries (GLCA: CLS + top patches);
      keys/values stay all tokens. Returns [B, R, dim_out].
    - ``return_rollout=True`` (self-attention only) also returns ``(q, k, lse)``: q, k [B, H, N, D]
      are views of the qkv projection that the attention keeps anyway, lse [B, H, N] fp32 comes
      with the fused output, so :func:`dcal.ops.attention_rollout` needs no extra memory.
    - ``return_kv=True`` also returns ``(k, v)``, the keys and values of x, [B, H, N, D] (views of
      the qkv projection), after the rollout statistics when both are asked for:
      ``(y, (q, k, lse), (k, v))``.
    - ``pair_kv=(k2, v2)``, each [B, H, Np, head_dim]: PWCA over keys/values of the pair that are
      already projected (and k-normed) by this module, e.g. those ``return_kv`` gave for the pair's
      own self-attention: the same result as ``pair`` without projecting the pair again.

    Masks, causal attention and attention dropout: the fused kernels never hold the probabilities
    and take no mask, so these calls run on PyTorch's ``F.scaled_dot_product_attention`` (SDPA)
    instead, exactly as timm's fused path does (its memory-efficient kernels on GPU, a
    materialising softmax on CPU):

    - ``attn_mask``: SDPA's semantics (bool: True takes part; float: added to the logits),
      broadcastable to [B, H, N, N + Np] (N + Np: the keys of x and of ``pair``); with
      ``query_index`` its rows are gathered with the queries.
    - ``is_causal=True``: self-attention only (refused with ``pair``, ``query_index`` or a mask).
    - ``attn_drop > 0`` in training: SDPA's dropout on the probabilities; with
      ``return_rollout`` the lse is then None (:func:`dcal.ops.attention_rollout` recomputes it).
    - ``return_rollout`` with a mask or ``is_causal`` is refused: the rollout assumes full attention.
    With ``attn_drop=0`` (the ViT default) or in eval, and no mask, the fused ops run.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
        *,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(qkv_bias, bool):
            raise ValueError(
                f"qkv_bias must be a bool, got {qkv_bias!r} (timm's attn_head_dim / dim_out are keyword arguments here)"
            )
        if attn_head_dim is None and dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when attn_head_dim is None")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.dim_out = dim_out or dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, self.dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check(self, x, pair, query_index, return_rollout, attn_mask, is_causal, pair_kv=None):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, {self.dim}] (dim={self.dim}), got {got}")
        if pair_kv is not None:
            if pair is not None:
                raise ValueError(
                    "pass the pair either as tokens (pair) or as projected keys/values (pair_kv), not both"
                )
            want = f"[{x.shape[0]}, {self.num_heads}, Np, {self.head_dim}]"
            if not (isinstance(pair_kv, (tuple, list)) and len(pair_kv) == 2):
                raise ValueError(f"pair_kv must be a pair (k2, v2) of tensors {want}, got {type(pair_kv).__name__}")
            k2, v2 = pair_kv
            for name, t in (("pair_kv[0] (k2)", k2), ("pair_kv[1] (v2)", v2)):
                if (
                    not isinstance(t, Tensor)
                    or t.dim() != 4
                    or t.shape[0] != x.shape[0]
                    or t.shape[1] != self.num_heads
                    or t.shape[3] != self.head_dim
                ):
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name} must be {want} (the batch of x, num_heads, head_dim), got {got}")
            if k2.shape[2] != v2.shape[2]:
                raise ValueError(f"pair_kv: k2 and v2 must hold as many tokens, got {k2.shape[2]} and {v2.shape[2]}")
        if pair is not None:
            if (
                not isinstance(pair, Tensor)
                or pair.dim() != 3
                or pair.shape[0] != x.shape[0]
                or pair.shape[-1] != self.dim
            ):
                got = tuple(pair.shape) if isinstance(pair, Tensor) else type(pair).__name__
                raise ValueError(f"pair must be [B, Np, {self.dim}] with the batch of x {tuple(x.shape)}, got {got}")
        if query_index is not None:
            if (
                not isinstance(query_index, Tensor)
                or query_index.dtype != torch.int64
                or query_index.dim() != 2
                or query_index.shape[0] != x.shape[0]
            ):
                raise ValueError(f"query_index must be an int64 [B, R] tensor with B={x.shape[0]}")
            if query_index.numel() and (query_index.min() < 0 or query_index.max() >= x.shape[1]):
                raise ValueError(f"query_index values must lie in [0, {x.shape[1]})")
        n_pair = pair.shape[1] if pair is not None else pair_kv[0].shape[2] if pair_kv is not None else None
        if return_rollout and (n_pair is not None or query_index is not None):
            raise ValueError(
                "return_rollout=True needs plain self-attention (pair=None, pair_kv=None, query_index=None)"
            )
        if not isinstance(is_causal, bool):
            raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
        if attn_mask is not None:
            B, N = x.shape[:2]
            _check_mask(attn_mask, (B, self.num_heads, N, N + (n_pair or 0)))
        if is_causal and (n_pair is not None or query_index is not None or attn_mask is not None):
            raise ValueError(
                "is_causal=True needs plain self-attention without attn_mask (pair=None, "
                "query_index=None, attn_mask=None); pass the mask you mean as attn_mask instead"
            )
        if return_rollout and (attn_mask is not None or is_causal):
            raise ValueError(
                "return_rollout=True needs unmasked attention (attn_mask=None, is_causal=False): "
                "the rollout is defined over full attention maps"
            )

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        *,
        pair: Optional[Tensor] = None,
        return_rollout: bool = False,
        query_index: Optional[Tensor] = None,
        pair_kv: Optional[Tuple[Tensor, Tensor]] = None,
        return_kv: bool = False,
    ):
        self._check(x, pair, query_index, return_rollout, attn_mask, is_causal, pair_kv)
        B, N, C = x.shape
        A = self.attn_dim
        w, b = self.qkv.weight, self.qkv.bias
        xq = x
        if query_index is None:
            q, k, v = _heads(self.qkv(x), 3, self.num_heads)
        else:
            # Only the chosen tokens need a query: project them with the q rows of the weight.
            xq = x.gather(1, query_index[..., None].expand(-1, -1, C))
            (q,) = _heads(F.linear(xq, w[:A], None if b is None else b[:A]), 1, self.num_heads)
            k, v = _heads(F.linear(x, w[A:], None if b is None else b[A:]), 2, self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        kv = [(k, v)]
        if pair is not None:
            # The pair only contributes keys and values: the k/v rows of the shared weight.
            k2, v2 = _heads(F.linear(pair, w[A:], None if b is None else b[A:]), 2, self.num_heads)
            kv.append((self.k_norm(k2), v2))
        elif pair_kv is not None:
            kv.append(tuple(pair_kv))
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None or is_causal or dropout > 0:
            out, lse = self._sdpa(q, kv, attn_mask, is_causal, dropout, query_index), None
        else:
            out, lse = ops.multi_kv_attention(q, kv, scale=self.scale, return_lse=True, backend=self.backend)
        y = self.norm(out.transpose(1, 2).reshape(B, q.shape[2], A))
        if self.gate is not None:
            y = y * self.gate(xq).sigmoid()
        y = self.proj_drop(self.proj(y))
        extra = ((q, k, lse),) if return_rollout else ()
        extra += ((k, v),) if return_kv else ()
        return (y,) + extra if extra else y

    def _sdpa(self, q, kv, attn_mask, is_causal, dropout, query_index):
        # See the class docstring: masks, causal and dropout run on SDPA over all keys at once.
        k = kv[0][0] if len(kv) == 1 else torch.cat([k for k, _ in kv], dim=2)
        v = kv[0][1] if len(kv) == 1 else torch.cat([v for _, v in kv], dim=2)
        if attn_mask is not None:
            if attn_mask.is_floating_point():
                attn_mask = attn_mask.to(q.dtype)
            if query_index is not None:
                while attn_mask.dim() < 4:
                    attn_mask = attn_mask[None]
                if attn_mask.shape[2] != 1:
                    m = attn_mask.expand(q.shape[0], attn_mask.shape[1], -1, -1)
                    idx = query_index[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3])
                    attn_mask = m.gather(2, idx)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
        )

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: Optional[str] = None) -> "PWCAAttention":
        """The fused module holding ``attn``'s own submodules (same parameter tensors, no copy),
        for a timm ``Attention`` (exactly that class; see :func:`dcal.nn.fuse_attention`)."""
        new = cls(
            attn.qkv.in_features,
            attn.num_heads,
            attn_head_dim=attn.head_dim,
            dim_out=attn.proj.out_features,
            backend=backend,
            device="meta",
        )
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            if hasattr(attn, name):  # older timm releases have no norm / gate
                setattr(new, name, getattr(attn, name))
        new.scale = attn.scale
        new.train(attn.training)
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
