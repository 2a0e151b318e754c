"""A small CLIP-style dual encoder: an image ViT on the fused attention (:class:`dcal.nn.PWCAAttention`,
self-attention path) and a causal text transformer, trained with a contrastive loss
(:class:`dcal.train.coupled.ClipLoss`).

``forward(image, text)`` returns ``(image_features, text_features, logit_scale.exp())`` with
L2-normalised features, the convention of open_clip's ``CLIP``, so the same loss and training
loop run either model. The text is pooled at its end-of-text token, which, as in CLIP, has the
largest id of the vocabulary (``text.argmax(-1)``). No BatchNorm anywhere: every output row depends
on its own input row only, which exact accumulation of a batch-coupled loss needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal.nn.pwca import PWCAAttention


@dataclass
class CLIPConfig:
    embed_dim: int = 64  # joint embedding
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vocab_size: int = 64  # the largest id is the end-of-text token
    context_length: int = 12
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 2
    mlp_ratio: float = 2.0
    dropout: float = 0.0  # after attention and MLP projections
    init_logit_scale: float = math.log(1 / 0.07)
    backend: Optional[str] = None  # of the image attention (dcal.ops)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        for w, h, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if w % h:
                raise ValueError(f"{name}_width ({w}) must be divisible by {name}_heads ({h})")


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask (PyTorch SDPA): the fused dcal ops take no mask."""

    def __init__(self, dim: int, num_heads: int, drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, causal: bool, backend=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (
            CausalSelfAttention(dim, num_heads, drop)
            if causal
            else PWCAAttention(dim, num_heads, qkv_bias=True, proj_drop=drop, backend=backend)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """ViT: patches -> CLS + position embeddings -> blocks (fused self-attention) -> CLS -> proj."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        n = (c.img_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(c.in_chans, c.vision_width, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.vision_width))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, c.vision_width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(c.vision_width, c.vision_heads, c.mlp_ratio, c.dropout, False, c.backend)
            for _ in range(c.vision_depth)
        )
        self.norm = nn.LayerNorm(c.vision_width)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, 0]))


class TextEncoder(nn.Module):
    """Token + position embeddings -> causal blocks -> the end-of-text token's state -> proj."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.context_length = c.context_length
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.pos_embed = nn.Parameter(torch.randn(1, c.context_length, c.text_width) * 0.01)
        self.blocks = nn.ModuleList(
            Block(c.text_width, c.text_heads, c.mlp_ratio, c.dropout, True) for _ in range(c.text_depth)
        )
        self.norm = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)

    def forward(self, text: Tensor) -> Tensor:
        if text.dim() != 2 or text.shape[1] > self.context_length:
            raise ValueError(
                f"text must be [B, L] token ids with L <= context_length={self.context_length}, got {tuple(text.shape)}"
            )
        x = self.token_embed(text) + self.pos_embed[:, : text.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), text.argmax(-1)])


class CLIP(nn.Module):
    """Dual encoder: ``forward(image [B, C, H, W], text [B', L]) -> (img [B, E], txt [B', E],
    logit_scale.exp())``, features L2-normalised."""

    def __init__(self, config: Optional[CLIPConfig] = None, **kwargs):
        super().__init__()
        self.config = c = config or CLIPConfig(**kwargs)
        self.visual = ImageEncoder(c)
        self.text = TextEncoder(c)
        self.logit_scale = nn.Parameter(torch.tensor(c.init_logit_scale))

    def no_weight_decay(self):
        return {"visual.cls_token", "visual.pos_embed", "text.pos_embed", "text.token_embed", "logit_scale"}

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        f = self.visual(image)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, image: Tensor, text: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()
