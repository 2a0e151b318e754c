"""One-line conversion of a model's attention to the fused modules of :mod:`dcal.nn`."""
from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from dcal.nn.mha import FusedMultiheadAttention
from dcal.nn.pwca import PWCAAttention


def _timm_attention():
    # timm is optional: a model can only hold timm modules if timm has been imported.
    mod = sys.modules.get("timm.layers.attention")
    return getattr(mod, "Attention", None)


def _replacement(name: str, mod: nn.Module, backend: Optional[str]) -> Optional[nn.Module]:
    timm_attn = _timm_attention()
    if timm_attn is not None and isinstance(mod, timm_attn):
        if type(mod) is not timm_attn:
            raise TypeError(f"fuse_attention: {name or 'model'} is a {type(mod).__module__}.{type(mod).__qualname__}, "
                            f"a subclass of timm's Attention whose forward or parameters may differ; it cannot "
                            f"be mapped (only timm.layers.Attention itself is)")
        return PWCAAttention.from_timm(mod, backend=backend)
    if isinstance(mod, nn.MultiheadAttention):
        if type(mod) is not nn.MultiheadAttention:
            raise TypeError(f"fuse_attention: {name or 'model'} is a {type(mod).__module__}.{type(mod).__qualname__}, "
                            f"a subclass of nn.MultiheadAttention; it cannot be mapped")
        try:
            return FusedMultiheadAttention.from_mha(mod, backend=backend)
        except ValueError as e:
            raise ValueError(f"fuse_attention: {name or 'model'}: {e}") from None
    return None


def fuse_attention(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Swap every attention module of ``model`` for its fused counterpart, in place, and return
    the model (the model itself if it is one such module: then the returned module replaces it).

    - timm ``Attention`` (timm 1.x: ViT, DeiT, and every timm model built from that class)
      -> :class:`PWCAAttention`, holding the same submodules (same parameter tensors).
    - ``nn.MultiheadAttention`` (torchvision's ViT encoder, ``nn.Transformer*`` layers)
      -> :class:`FusedMultiheadAttention`, holding the same parameter tensors; called with
      ``need_weights=False`` (what torchvision does), it returns ``(out, None)``.

    Parameter names, tensors and state dicts stay as they were, so an optimiser built before the
    conversion keeps working and checkpoints load either way. A subclass of either class (its
    forward may differ), an ``nn.MultiheadAttention`` with ``kdim``/``vdim`` != ``embed_dim``,
    ``add_bias_kv`` or ``add_zero_attn`` raises naming the module; other attention classes (timm's
    ``AttentionRope``, window attention, ...) are left untouched.
    ``backend`` is passed to the fused ops (None: automatic).
    """
    if backend is not None:
        from dcal import ops

        if backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
    top = _replacement("", model, backend)
    if top is not None:
        return top
    done = {}
    # Collect first: the module tree must not change while it is walked.
    targets = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False) if name]
    for name, mod in targets:
        if id(mod) not in done:
            done[id(mod)] = _replacement(name, mod, backend)
        new = done[id(mod)]
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model
