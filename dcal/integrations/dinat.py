"""Hugging Face DiNAT on :func:`dcal.ops.neighborhood_attention2d`.

transformers' ``modeling_dinat`` calls ``natten.functional.natten2dqkrpb`` / ``natten2dav``, which
NATTEN removed in 0.17.5: with a current NATTEN the module does not even import, without NATTEN
its models refuse to be built. dcal's ``border="clamp"`` with a relative position bias and
dilation is exactly those functions' semantics (NATTEN's window shifted inside the map, the
dilated map split into interleaved sub-grids, ``rpb[h, (key - query) / dilation + k - 1]``),
forward and backward, fused. So::

    from dcal.integrations.transformers import load_dinat, use_dcal_neighborhood
    load_dinat()                                    # HF's modeling_dinat, importable and buildable
    from transformers import DinatConfig, DinatModel
    model = use_dcal_neighborhood(DinatModel(DinatConfig(...)))

- :func:`load_dinat` imports ``transformers.models.dinat.modeling_dinat`` whatever NATTEN is
  installed (none, or one without the old functions), binds the old function names in that
  module to placeholders that raise an error pointing here, and lets its models be built
  without NATTEN (its ``requires_backends`` check skips ``"natten"``). Nothing else changes.
- :func:`use_dcal_neighborhood` swaps every HF ``NeighborhoodAttention`` of a model for a
  :class:`DcalNeighborhoodAttention` holding the same parameters (same tensors, same state-dict
  names), in place.

The module computes what DiNAT's HF module computed with NATTEN <= 0.17.4 (transformers 4.x:
per-head ``[B, H, X, Y, D]`` maps). transformers 5.x's rewrite of the module reshapes the
projections with ``view(...).transpose(1, 2)`` into ``[B, Y, X, H, D]`` before the NATTEN call,
which reads the width as heads; it never ran (the functions it calls were gone); this module
keeps the original layout.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal import ops

__all__ = ["load_dinat", "use_dcal_neighborhood", "DcalNeighborhoodAttention", "windowed_neighborhood_attention"]

_MODULE = "transformers.models.dinat.modeling_dinat"
_OLD_FUNCTIONS = ("natten2dqkrpb", "natten2dav")


def _removed(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(
            f"natten.functional.{name} was removed in NATTEN 0.17.5, so transformers' DiNAT attention cannot run "
            f"as written; convert the model first: dcal.integrations.transformers.use_dcal_neighborhood(model)"
        )

    fn.__name__ = name
    return fn


def _requires_backends_without_natten(original):
    def requires_backends(obj, backends):
        backends = [b for b in ([backends] if isinstance(backends, str) else list(backends)) if b != "natten"]
        if backends:
            original(obj, backends)

    requires_backends._dcal_wrapped = True
    return requires_backends


def load_dinat():
    """Import and return transformers' ``modeling_dinat`` so that its models can be built whatever
    NATTEN is installed; run it before ``from transformers import DinatModel`` (which imports the
    module). The old NATTEN functions the module calls become placeholders that raise, naming
    :func:`use_dcal_neighborhood`; its constructors no longer require NATTEN. Idempotent."""
    mod = sys.modules.get(_MODULE)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULE)
        except ImportError as e:
            if not any(n in str(e) for n in _OLD_FUNCTIONS):
                raise
            # A NATTEN without the old functions is installed: lend them for the import only.
            import natten.functional as nf

            added = [n for n in _OLD_FUNCTIONS if not hasattr(nf, n)]
            for n in added:
                setattr(nf, n, _removed(n))
            try:
                mod = importlib.import_module(_MODULE)
            finally:
                for n in added:
                    delattr(nf, n)
    for n in _OLD_FUNCTIONS:
        # keep a real old NATTEN's function; replace HF's stubs (no NATTEN) and the lent placeholders
        if getattr(getattr(mod, n, None), "__module__", None) != "natten.functional":
            setattr(mod, n, _removed(n))
    if not getattr(mod.requires_backends, "_dcal_wrapped", False):
        mod.requires_backends = _requires_backends_without_natten(mod.requires_backends)
    return mod


# ----------------------------------------------------------------------------- windows (materialising)


def _clamp_windows(length: int, kernel_size: int, dilation: int, device) -> tuple:
    """Per position i of an axis: key positions [length, k] and rpb indices [length, k] of NATTEN's
    clamp rule with dilation (each residue class mod dilation is a sub-grid with its own window)."""
    i = torch.arange(length, device=device)
    r, t = i % dilation, i // dilation
    n = (length - r + dilation - 1) // dilation  # sub-grid length of each position's residue class
    start = (t - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, n - kernel_size)
    u = torch.arange(kernel_size, device=device)
    sub = start[:, None] + u[None, :]  # sub-grid indices of the window
    keys = r[:, None] + dilation * sub
    rel = sub - t[:, None] + kernel_size - 1
    return keys, rel


def windowed_neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
):
    """Materialising clamp-border neighborhood attention (NATTEN <= 0.17.4's natten2dqkrpb +
    softmax + dropout + natten2dav) on [B, H, X, Y, D]: returns ``(out [B, H, X, Y, D], probs
    [B, H, X, Y, k*k])``. Used where the maps are asked for or attention dropout is on; holds
    k*k copies of the keys (the fused op does not)."""
    B, H, X, Y, _ = q.shape
    kx, rx = _clamp_windows(X, kernel_size, dilation, q.device)
    ky, ry = _clamp_windows(Y, kernel_size, dilation, q.device)
    kk = k[:, :, kx][:, :, :, :, ky]  # [B, H, X, k, Y, k, D]
    vv = v[:, :, kx][:, :, :, :, ky]
    logits = torch.einsum("bhxyd,bhxaycd->bhxyac", q * scale, kk)
    if rpb is not None:
        logits = logits + rpb[:, rx[:, :, None, None], ry[None, None, :, :]].permute(0, 1, 3, 2, 4)[None]
    probs = logits.reshape(B, H, X, Y, kernel_size * kernel_size).softmax(dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    out = torch.einsum("bhxyac,bhxaycd->bhxyd", probs.view(B, H, X, Y, kernel_size, kernel_size), vv)
    return out, probs


# ----------------------------------------------------------------------------- module


class DcalNeighborhoodAttention(nn.Module):
    """HF DiNAT's ``NeighborhoodAttention`` (same submodules ``query``, ``key``, ``value``,
    ``dropout`` and parameter ``rpb``, same forward ``(hidden_states [B, X, Y, C],
    output_attentions=False) -> (context,)`` or ``(context, probs [B, H, X, Y, k*k])``) on
    :func:`dcal.ops.neighborhood_attention2d` with ``border="clamp"``, its relative position bias
    and dilation: fused, exact, memory linear in the pixels, forward and backward.

    With ``output_attentions=True``, or attention dropout > 0 in training, the call runs the
    materialising windowed math (:func:`windowed_neighborhood_attention`): the fused kernels never
    hold the probabilities. The map must be at least ``kernel_size * dilation`` per axis (HF's
    ``DinatLayer`` pads it to that).
    """

    def __init__(self, hf_module: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.num_attention_heads = hf_module.num_attention_heads
        self.attention_head_size = hf_module.attention_head_size
        self.all_head_size = hf_module.all_head_size
        self.kernel_size = int(hf_module.kernel_size)
        self.dilation = int(hf_module.dilation)
        self.rpb = hf_module.rpb
        self.query, self.key, self.value = hf_module.query, hf_module.key, hf_module.value
        self.dropout = hf_module.dropout
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_attention_heads}, head_dim={self.attention_head_size}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, border=clamp, backend={self.backend}"
        )

    def forward(self, hidden_states: Tensor, output_attentions: Optional[bool] = False):
        if hidden_states.dim() != 4 or hidden_states.shape[-1] != self.all_head_size:
            raise ValueError(f"hidden_states must be [B, X, Y, {self.all_head_size}], got {tuple(hidden_states.shape)}")
        B, X, Y, _ = hidden_states.shape
        H, D = self.num_attention_heads, self.attention_head_size
        q, k, v = (
            proj(hidden_states).view(B, X, Y, H, D).permute(0, 3, 1, 2, 4)
            for proj in (self.query, self.key, self.value)
        )
        scale = D**-0.5
        p = float(self.dropout.p) if self.training else 0.0
        probs = None
        if output_attentions or p > 0.0:
            if X < self.kernel_size * self.dilation or Y < self.kernel_size * self.dilation:
                raise ValueError(
                    f"the map ({X}x{Y}) must be at least kernel_size*dilation = "
                    f"{self.kernel_size * self.dilation} per axis (NATTEN's clamp window)"
                )
            out, probs = windowed_neighborhood_attention(
                q, k, v, self.rpb, self.kernel_size, self.dilation, scale, dropout=p, training=self.training
            )
        else:
            out = ops.neighborhood_attention2d(
                q,
                k,
                v,
                kernel_size=self.kernel_size,
                border="clamp",
                rpb=self.rpb,
                scale=scale,
                dilation=self.dilation,
                backend=self.backend,
            )
        context = out.permute(0, 2, 3, 1, 4).reshape(B, X, Y, H * D)
        return (context, probs) if output_attentions else (context,)


def use_dcal_neighborhood(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Swap every HF DiNAT ``NeighborhoodAttention`` in ``model`` for a
    :class:`DcalNeighborhoodAttention` holding the same parameter tensors, in place; return the
    model (or the replacement, if ``model`` is itself such a module). A model without any raises
    ``ValueError``; a subclass of HF's class (its forward may differ) raises ``TypeError``.
    ``backend`` goes to :func:`dcal.ops.neighborhood_attention2d` (None: automatic)."""
    if backend is not None and backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
    mod = sys.modules.get(_MODULE)
    hf_cls = getattr(mod, "NeighborhoodAttention", None)
    if hf_cls is None:
        raise ValueError(
            "use_dcal_neighborhood: the model holds no HF DiNAT NeighborhoodAttention "
            "(transformers' modeling_dinat is not loaded; build the model after load_dinat())"
        )

    def replace(name, m):
        if type(m) is not hf_cls:
            raise TypeError(
                f"use_dcal_neighborhood: {name or 'model'} is a {type(m).__module__}.{type(m).__qualname__}, "
                f"a subclass of HF's NeighborhoodAttention whose forward may differ; it cannot be mapped"
            )
        return DcalNeighborhoodAttention(m, backend=backend)

    if isinstance(model, hf_cls):
        return replace("", model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, hf_cls)]
    if not found:
        raise ValueError("use_dcal_neighborhood: the model holds no HF DiNAT NeighborhoodAttention module")
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replace(name, m))
    return model
