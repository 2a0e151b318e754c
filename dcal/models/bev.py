"""BEV graph module: a stack of local 7x7 "graph" attention blocks over BEV feature maps.

Each block is :class:`dcal.nn.LocalGraphAttention` (pre-norm neighborhood attention with its own
residual) followed by a pointwise MLP (1x1 convs) with a pre-norm residual::

    x = x + proj(na(qkv(norm1(x))))        # LocalGraphAttention
    x = x + fc2(gelu(fc1(norm2(x))))       # ConvMlp

[B, C, X, Y] in, [B, C, X, Y] out; the output is the residual stream itself (no final norm), so
the module drops in where the unfold stack of the original BEV models sat. Memory is linear in pixels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dcal.nn.neighborhood import LocalGraphAttention, make_norm2d

__all__ = ["BEVGraphModule", "BEVBlock", "ConvMlp"]


class ConvMlp(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BEVBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        num_heads: int,
        kernel_size: int,
        mlp_ratio: float,
        border: str,
        rel_pos_bias: bool,
        norm: Optional[str],
        backend: Optional[str],
    ):
        super().__init__()
        self.attn = LocalGraphAttention(
            channels, num_heads, kernel_size, border, rel_pos_bias, norm=norm, backend=backend
        )
        self.norm = make_norm2d(norm, channels)
        self.mlp = ConvMlp(channels, max(1, round(channels * mlp_ratio)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x)
        return x + self.mlp(self.norm(x))


class BEVGraphModule(nn.Module):
    """A stack of ``num_layers`` BEV blocks (LocalGraphAttention + MLP) on [B, C, X, Y] maps.

    Args:
        channels: C (= num_heads * head_dim).
        num_layers: blocks in the stack (>= 1).
        num_heads, kernel_size, border, rel_pos_bias, norm, backend: of every
            :class:`~dcal.nn.LocalGraphAttention` (norm also before each MLP).
        mlp_ratio: hidden channels of the MLP per input channel.

    ``set_grad_checkpointing()`` recomputes each block in the backward pass instead of keeping its
    activations (``torch.utils.checkpoint``, ``use_reentrant=False``).
    """

    def __init__(
        self,
        channels: int,
        num_layers: int = 3,
        num_heads: int = 4,
        kernel_size: int = 7,
        mlp_ratio: float = 2.0,
        border: str = "zero",
        rel_pos_bias: bool = True,
        norm: Optional[str] = "layer",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.channels = channels
        self.blocks = nn.ModuleList(
            BEVBlock(channels, num_heads, kernel_size, float(mlp_ratio), border, rel_pos_bias, norm, backend)
            for _ in range(num_layers)
        )
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, C, X, Y] with C={self.channels}, got {shape}")
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x
