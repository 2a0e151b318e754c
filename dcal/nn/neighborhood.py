"""Neighborhood-attention modules: NATTEN's ``NeighborhoodAttention2D`` and the BEV block.

Both call :func:`dcal.ops.neighborhood_attention2d` (fused, exact, memory linear in pixels) and
differ only in layout and surroundings:

* :class:`NeighborhoodAttention2D`: channels-last ``[B, X, Y, C]`` in and out, Linear projections
  (NATTEN's module).
* :class:`LocalGraphAttention`: channels-first ``[B, C, X, Y]`` (BEV feature maps), 1x1 conv
  projections, its own residual and norm: ``x + proj(attn(qkv(norm(x))))`` (pre-norm).

Weight mapping
==============

Head split (both modules, and both sources below): the projection's 3C output channels are
``(q | k | v) x heads x head_dim``, i.e. channel ``s*C + h*D + d`` is component ``s`` of head ``h``,
dimension ``d``.

From NATTEN (``natten.NeighborhoodAttention2D``) -- names and shapes are NATTEN's, so
``load_state_dict(natten_module.state_dict(), strict=True)`` works unchanged::

    NATTEN name    shape                  dcal name      notes
    qkv.weight     [3C, C]                qkv.weight
    qkv.bias       [3C]                   qkv.bias       absent with qkv_bias=False (both)
    rpb            [H, 2k-1, 2k-1]        rpb            NATTEN <= 0.17 with bias / rel_pos_bias=True;
                                                         NATTEN >= 0.18 has none: use rel_pos_bias=False
    proj.weight    [C, C]                 proj.weight
    proj.bias      [C]                    proj.bias

  The constructor takes NATTEN's arguments (``embed_dim``, ``num_heads``, ``kernel_size``,
  ``dilation``, ``qkv_bias``, ``qk_scale``, ``proj_drop``; ``stride`` and ``is_causal`` at their
  defaults only); called with ``embed_dim=`` it defaults to NATTEN's function (``border="clamp",
  rel_pos_bias=False``), called with ``dim`` to dcal's (``border="zero", rel_pos_bias=True``).
  NATTEN's semantics are ``border="clamp"`` (NATTEN shifts the window inside the map; with dilation,
  inside each of the ``dilation`` interleaved sub-grids; the rpb index convention is the same, so
  one table serves every border mode); :meth:`NeighborhoodAttention2D.from_natten` reads all of
  it from a NATTEN module and loads its weights strictly. Not carried over: stride,
  causal masks, attention dropout (the fused kernels never hold the probabilities), per-axis
  kernel sizes or dilations that differ, and NATTEN's zero-padding of maps smaller than the
  window (``"clamp"`` refuses such maps, naming kernel_size and dilation; ``"zero"`` and
  ``"mask"`` take them).

From the unfold BEV block (1x1 convs for q, k and v, ``F.unfold`` of k and v with padding k//2,
softmax over the k*k window, 1x1 out conv, residual): :class:`LocalGraphAttention` with
``border="zero", rel_pos_bias=False, norm=None`` reproduces it exactly (fp64 to rounding)::

    unfold name                    shape          dcal name               rows
    q_conv.weight / .bias          [C, C, 1, 1]   qkv.weight / .bias      [0, C)
    k_conv.weight / .bias          [C, C, 1, 1]   qkv.weight / .bias      [C, 2C)
    v_conv.weight / .bias          [C, C, 1, 1]   qkv.weight / .bias      [2C, 3C)
    out_conv.weight / .bias        [C, C, 1, 1]   proj.weight / .bias
    (one qkv conv, q|k|v order)    [3C, C, 1, 1]  qkv.weight / .bias      as is

  :func:`convert_unfold_state_dict` does this renaming (other source names can be passed), and
  :meth:`LocalGraphAttention.from_unfold_state_dict` builds the module from such a state dict.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal.ops import BACKENDS, BORDERS, neighborhood_attention2d
from dcal.ops import _validate as V
from dcal.ops.natten import one_value

__all__ = ["NeighborhoodAttention2D", "LocalGraphAttention", "LayerNorm2d", "make_norm2d", "convert_unfold_state_dict"]

NORMS = ("layer", "group", "batch", None)


def _check_common(dim_name: str, dim: int, num_heads: int, kernel_size, border, backend) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if dim % num_heads:
        raise ValueError(f"{dim_name}={dim} is not divisible by num_heads={num_heads}")
    V.kernel_size(kernel_size)
    V.border(border, BORDERS)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS} or None")


def _make_rpb(num_heads: int, kernel_size: int) -> nn.Parameter:
    rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
    nn.init.trunc_normal_(rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)  # NATTEN's init
    return rpb


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    kernel_size: int,
    border: str,
    scale: Optional[float],
    backend: Optional[str],
    dilation: int = 1,
) -> Tensor:
    # Under autocast q is fp16/bf16 while the table stays fp32; the op wants one dtype.
    rpb = None if rpb is None else rpb.to(q.dtype)
    return neighborhood_attention2d(
        q,
        k,
        v,
        kernel_size=kernel_size,
        border=border,
        rpb=rpb,
        scale=scale,
        dilation=dilation,
        backend=backend,
        layout="heads_first",
    )


class NeighborhoodAttention2D(nn.Module):
    """2-D neighborhood attention with NATTEN's constructor and parameters, on channels-last maps
    [B, X, Y, C].

    Args:
        dim (or NATTEN's ``embed_dim``): channels C (= num_heads * head_dim).
        num_heads: heads H.
        kernel_size: odd window size k >= 3 (NATTEN's per-axis pair if both entries are equal).
        border: "zero" (unfold semantics), "mask" or "clamp" (NATTEN's); see
            :func:`dcal.ops.neighborhood_attention2d`. Default: "zero", or "clamp" when the
            channels are passed as ``embed_dim`` (NATTEN's constructor).
        rel_pos_bias: learn a relative position bias ``rpb`` [H, 2k-1, 2k-1]. Default: True, or
            False when the channels are passed as ``embed_dim`` (NATTEN >= 0.18 has no rpb).
        qkv_bias: bias of the qkv projection.
        qk_scale: logit scale, default ``head_dim ** -0.5``.
        proj_drop: dropout after the output projection.
        backend: None (automatic) or a backend name of :mod:`dcal.ops`.
        dilation: window step (DiNAT); an int or NATTEN's pair of equal ints.
        stride, is_causal: NATTEN's; only their defaults (1, False) are supported, other values raise.

    NATTEN compatibility: the defaults of ``border`` and ``rel_pos_bias`` follow the signature
    used. Built with NATTEN's keyword ``embed_dim=`` (NATTEN's constructor), the module computes
    what NATTEN 0.21's module computes: ``border="clamp"``, no rpb, so
    ``load_state_dict(natten_module.state_dict())`` works strictly and gives NATTEN's output.
    Built with ``dim`` (dcal's signature) the defaults are dcal's: ``border="zero"``,
    ``rel_pos_bias=True``; a strict load of a NATTEN state dict then fails with a message naming
    the two ways to NATTEN's function: ``NeighborhoodAttention2D.from_natten(natten_module)``
    (weights loaded strictly, clamp border, rpb as in that module) or ``border="clamp",
    rel_pos_bias=False``. A non-strict load of such a state dict warns (the rpb stays random).
    Explicit ``border`` / ``rel_pos_bias`` always win. See the module docstring for the mapping.

    Forward: q, k and v reach the op as strided views of the projection output, and the op's
    output comes back in their dim order ([B, X, Y, H, D] in memory), so it is a view of
    [B, X, Y, C] for the output projection: no copy either way.
    """

    def __init__(
        self,
        dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        kernel_size=7,
        border: Optional[str] = None,
        rel_pos_bias: Optional[bool] = None,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
        *,
        dilation=1,
        embed_dim: Optional[int] = None,
        stride=1,
        is_causal=False,
    ):
        super().__init__()
        if (dim is None) == (embed_dim is None):
            raise ValueError(
                f"pass the channels once, as dim or embed_dim (NATTEN's name); got dim={dim!r}, embed_dim={embed_dim!r}"
            )
        natten_ctor = embed_dim is not None  # NATTEN's signature: NATTEN's function by default
        dim = dim if embed_dim is None else embed_dim
        if border is None:
            border = "clamp" if natten_ctor else "zero"
        if rel_pos_bias is None:
            rel_pos_bias = not natten_ctor
        kernel_size, dilation = one_value("kernel_size", kernel_size), one_value("dilation", dilation)
        if one_value("stride", stride) != 1:
            raise ValueError(f"stride={stride!r} is not supported (only 1, NATTEN's default)")
        if one_value("is_causal", is_causal) is not False:
            raise ValueError(f"is_causal={is_causal!r} is not supported (only False, NATTEN's default)")
        _check_common("dim", dim, num_heads, kernel_size, border, backend)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size, self.border, self.backend = kernel_size, border, backend
        self.dilation = V.dilation(dilation)
        self.scale = V.scale(qk_scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = _make_rpb(num_heads, kernel_size) if rel_pos_bias else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_natten(cls, module: nn.Module, backend: Optional[str] = None) -> "NeighborhoodAttention2D":
        """The module computing what ``module`` (a ``natten.NeighborhoodAttention2D``) computes:
        ``border="clamp"``, its kernel size, dilation, scale and biases (an ``rpb`` if that NATTEN
        version has one), its weights loaded with ``strict=True`` onto its device and dtype.
        Raises on what the fused op cannot express (stride, causal masks, attention dropout)."""
        if getattr(module, "na_dim", 2) != 2 or not hasattr(module, "qkv") or not hasattr(module, "proj"):
            raise TypeError(f"from_natten needs a natten.NeighborhoodAttention2D, got {type(module).__name__}")
        attn_drop = getattr(module, "attn_drop", None)
        if attn_drop is not None and getattr(attn_drop, "p", 0.0) > 0:
            raise ValueError(f"attn_drop={attn_drop.p}: attention dropout is not supported by the fused op")
        rpb = getattr(module, "rpb", None)
        w = module.qkv.weight
        new = cls(
            embed_dim=module.qkv.in_features,
            num_heads=module.num_heads,
            kernel_size=module.kernel_size,
            border="clamp",
            rel_pos_bias=rpb is not None,
            qkv_bias=module.qkv.bias is not None,
            qk_scale=float(module.scale),
            proj_drop=module.proj_drop.p,
            backend=backend,
            dilation=getattr(module, "dilation", 1),
            stride=getattr(module, "stride", 1),
            is_causal=getattr(module, "is_causal", False),
        )
        new.to(device=w.device, dtype=w.dtype).load_state_dict(module.state_dict(), strict=True)
        return new.train(module.training)

    def _natten_hint(self, prefix: str = "") -> str:
        return (
            f"the state dict has no '{prefix}rpb' but this module has a relative position bias "
            f"(rel_pos_bias=True, border={self.border!r}); a NATTEN >= 0.18 NeighborhoodAttention2D has "
            "none and uses the clamp border. To compute what that NATTEN module computes, use "
            'NeighborhoodAttention2D.from_natten(natten_module), or construct with border="clamp", '
            "rel_pos_bias=False (what NATTEN's constructor, NeighborhoodAttention2D(embed_dim=..., ...), "
            "gives by default)"
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a strict load of weights without the ``rpb`` this module
        has (a NATTEN >= 0.18 state dict) raises before anything is copied, saying what to do."""
        if strict and self.rpb is not None and "rpb" not in state_dict and "qkv.weight" in state_dict:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                f'Missing key(s) in state_dict: "rpb": {self._natten_hint()}'
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Loaded as part of a model (or non-strictly): torch does not tell this module whether
        # the load is strict, so a missing table is reported by a warning next to torch's error.
        if self.rpb is not None and prefix + "rpb" not in state_dict and prefix + "qkv.weight" in state_dict:
            warnings.warn(
                f"{self._natten_hint(prefix)}; the rpb keeps its current (random) values", UserWarning, stacklevel=2
            )

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, X, Y, C] with C={self.dim} (channels last), got {shape}")
        B, X, Y, C = x.shape
        # [B, X, Y, 3, H, D]: q, k, v are strided [B, H, X, Y, D] views (head dim unit-stride).
        qkv = self.qkv(x).view(B, X, Y, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3))
        out = _attend(q, k, v, self.rpb, self.kernel_size, self.border, self.scale, self.backend, self.dilation)
        # out is laid out [B, X, Y, H, D] (q's dim order): a view, not a copy
        out = out.permute(0, 2, 3, 1, 4).reshape(B, X, Y, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, border={self.border!r}, rel_pos_bias={self.rpb is not None}, "
            f"backend={self.backend!r}"
        )


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a [B, C, X, Y] map (timm's ``LayerNorm2d``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def make_norm2d(norm: Optional[str], channels: int) -> nn.Module:
    """The norm of a [B, C, X, Y] block: "layer" (per-pixel LayerNorm over C, eps 1e-6),
    "group" (GroupNorm with gcd(32, C) groups), "batch" (BatchNorm2d) or None (identity)."""
    if norm == "layer":
        return LayerNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm is None:
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class LocalGraphAttention(nn.Module):
    """The BEV "local graph" attention block on channels-first maps [B, C, X, Y]:
    ``x + proj(neighborhood_attention(qkv(norm(x))))`` with 1x1 conv ``qkv`` and ``proj``.

    Args:
        channels: C (= num_heads * head_dim).
        num_heads: heads H.
        kernel_size: odd window size k >= 3 (the original BEV module uses 7).
        border: "zero" (default: exactly the F.pad + F.unfold block), "mask" or "clamp".
        rel_pos_bias: learn ``rpb`` [H, 2k-1, 2k-1] (NATTEN's init).
        norm: "layer" (default), "group", "batch" or None. Pre-norm: the residual path stays
            un-normalised, as in Swin/NAT blocks, which is what stacks trained from scratch want.
            LayerNorm over the channels of each pixel does not depend on batch size or map size
            (BEV batches are small); "batch" updates its running statistics twice per step under
            gradient checkpointing. ``None`` gives the unfold block exactly.
        qkv_bias: bias of the qkv conv.
        backend: None (automatic) or a backend name of :mod:`dcal.ops`.

    Memory is linear in pixels: no unfold of k and v (the unfold block holds 2 * k*k copies of the
    map, plus the [.., k*k, X*Y] attention matrix for backward). q, k, v are views of the qkv conv
    output and the op's output comes back in their dim order, so it is a view of the [B, C, X, Y]
    map (channels-first, or channels-last after the per-pixel LayerNorm): no copy either way.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 4,
        kernel_size: int = 7,
        border: str = "zero",
        rel_pos_bias: bool = True,
        norm: Optional[str] = "layer",
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        _check_common("channels", channels, num_heads, kernel_size, border, backend)
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.kernel_size, self.border, self.backend = kernel_size, border, backend
        self.norm = make_norm2d(norm, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=qkv_bias)
        self.rpb = _make_rpb(num_heads, kernel_size) if rel_pos_bias else None
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, C, X, Y] with C={self.channels} (channels first), got {shape}")
        B, C, X, Y = x.shape
        # [B, 3, H, D, X, Y]: q, k, v are strided [B, H, X, Y, D] views (head-dim stride X*Y).
        qkv = self.qkv(self.norm(x)).view(B, 3, self.num_heads, self.head_dim, X, Y)
        q, k, v = (qkv[:, i].permute(0, 1, 3, 4, 2) for i in range(3))
        out = _attend(q, k, v, self.rpb, self.kernel_size, self.border, None, self.backend)
        # out is laid out like q ([B, H, D, X, Y] or [B, X, Y, H, D] in memory): a view, not a copy
        out = out.permute(0, 1, 4, 2, 3).reshape(B, C, X, Y)
        return x + self.proj(out)

    @classmethod
    def from_unfold_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        num_heads: int,
        kernel_size: int = 7,
        *,
        names: Optional[Dict[str, str]] = None,
        backend: Optional[str] = None,
        **kwargs,
    ) -> "LocalGraphAttention":
        """The block that computes exactly what the unfold block with these weights computes
        (``border="zero", rel_pos_bias=False, norm=None``). ``names`` overrides the source module
        names (keys "q", "k", "v", "out", "qkv"); see :func:`convert_unfold_state_dict`."""
        sd = convert_unfold_state_dict(state_dict, **(names or {}))
        channels = sd["proj.weight"].shape[0]
        kwargs.setdefault("border", "zero")
        mod = cls(
            channels,
            num_heads,
            kernel_size,
            rel_pos_bias=False,
            norm=None,
            qkv_bias="qkv.bias" in sd,
            backend=backend,
            **kwargs,
        )
        mod.to(sd["proj.weight"].dtype).load_state_dict(sd)  # cast first: loading copies into the params' dtype
        return mod

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"border={self.border!r}, rel_pos_bias={self.rpb is not None}, backend={self.backend!r}"
        )


def _conv1x1(w: Tensor, name: str) -> Tensor:
    if w.dim() == 2:
        w = w[:, :, None, None]
    if w.dim() != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"{name} must be a 1x1 conv weight [out, in, 1, 1] (or [out, in]), got {tuple(w.shape)}")
    return w


def convert_unfold_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    q: str = "q_conv",
    k: str = "k_conv",
    v: str = "v_conv",
    out: str = "out_conv",
    qkv: str = "qkv",
) -> Dict[str, Tensor]:
    """Rename an unfold BEV block's state dict to :class:`LocalGraphAttention`'s names.

    The source holds either three 1x1 convs ``{q}``, ``{k}``, ``{v}`` or one ``{qkv}`` conv with
    q|k|v output order, and the output conv ``{out}``; keys are ``<name>.weight`` / ``<name>.bias``
    (strip any parent prefix first). Returns ``qkv.weight`` [3C, C, 1, 1], ``qkv.bias`` (when the
    source has biases) and ``proj.weight`` / ``proj.bias``.
    """
    sd = dict(state_dict)
    res: Dict[str, Tensor] = {}
    if f"{qkv}.weight" in sd:
        res["qkv.weight"] = _conv1x1(sd[f"{qkv}.weight"], f"{qkv}.weight")
        if f"{qkv}.bias" in sd:
            res["qkv.bias"] = sd[f"{qkv}.bias"]
    else:
        missing = [f"{n}.weight" for n in (q, k, v) if f"{n}.weight" not in sd]
        if missing:
            raise KeyError(
                f"state_dict has neither {qkv}.weight nor {missing}; pass the source names (q=, k=, v=, out= or qkv=)"
            )
        res["qkv.weight"] = torch.cat([_conv1x1(sd[f"{n}.weight"], f"{n}.weight") for n in (q, k, v)], 0)
        biases = [sd.get(f"{n}.bias") for n in (q, k, v)]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise KeyError(f"state_dict has biases for only some of {q}, {k}, {v}")
            res["qkv.bias"] = torch.cat(biases, 0)
    if f"{out}.weight" not in sd:
        raise KeyError(f"state_dict has no {out}.weight (the output 1x1 conv); pass out=<name>")
    res["proj.weight"] = _conv1x1(sd[f"{out}.weight"], f"{out}.weight")
    c = res["proj.weight"].shape[0]
    res["proj.bias"] = sd.get(f"{out}.bias", res["proj.weight"].new_zeros(c))
    if tuple(res["qkv.weight"].shape[:2]) != (3 * c, c):
        raise ValueError(
            f"q/k/v weights give a qkv weight of shape {tuple(res['qkv.weight'].shape)}; "
            f"expected [{3 * c}, {c}, 1, 1] for {c} channels"
        )
    return res
