"""One-line conversion of a model's attention to the fused modules of :mod:`dcal.nn`."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional, Tuple, Union

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
            raise TypeError(
                f"fuse_attention: {name or 'model'} is a {type(mod).__module__}.{type(mod).__qualname__}, "
                f"a subclass of timm's Attention whose forward or parameters may differ; it cannot "
                f"be mapped (only timm.layers.Attention itself is)"
            )
        return PWCAAttention.from_timm(mod, backend=backend)
    if isinstance(mod, nn.MultiheadAttention):
        if type(mod) is not nn.MultiheadAttention:
            raise TypeError(
                f"fuse_attention: {name or 'model'} is a {type(mod).__module__}.{type(mod).__qualname__}, "
                f"a subclass of nn.MultiheadAttention; it cannot be mapped"
            )
        try:
            return FusedMultiheadAttention.from_mha(mod, backend=backend)
        except ValueError as e:
            raise ValueError(f"fuse_attention: {name or 'model'}: {e}") from None
    return None


logger = logging.getLogger(__name__)


def _unconverted_attention(model: nn.Module) -> str:
    """Names of the attention-like classes left in ``model`` (for the warning), most frequent first."""
    counts = {}
    for mod in model.modules():
        name = type(mod).__name__
        if "attention" in name.lower() and not isinstance(mod, (PWCAAttention, FusedMultiheadAttention)):
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def fuse_attention(
    model: nn.Module, *, backend: Optional[str] = None, return_count: bool = False
) -> Union[nn.Module, Tuple[nn.Module, int]]:
    """Swap every attention module of ``model`` for its fused counterpart, in place, and return
    the model (the model itself if it is one such module: then the returned module replaces it).
    With ``return_count=True`` it returns ``(model, n)``, ``n`` the number of modules converted
    (a module reachable under several names counts once). The count is logged at INFO
    (logger ``dcal.nn.convert``), and a ``UserWarning`` says so when nothing was converted (a CNN,
    or a model whose attention is another class, e.g. Swin's window attention), naming the
    attention-like classes it found.

    What it buys: on a plain ViT the fused op computes what PyTorch's fused SDPA (timm's default
    path) already computes, so speed and memory stay about the same; the memory gains of dcal are
    in PWCA (:class:`PWCAAttention` with ``pair=``), GLCA's rollout and neighborhood attention.

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
        return _done(model, top, 1, return_count)
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
    return _done(model, model, sum(new is not None for new in done.values()), return_count)


def _done(model: nn.Module, result: nn.Module, n: int, return_count: bool):
    what = type(model).__name__
    logger.info("fuse_attention: converted %d attention module%s of %s", n, "" if n == 1 else "s", what)
    if n == 0:
        found = _unconverted_attention(model)
        warnings.warn(
            f"fuse_attention converted no module of {what}: it converts timm's Attention (with timm imported) "
            f"and torch.nn.MultiheadAttention only; "
            + (f"attention-like modules left as they were: {found}" if found else "the model has no attention module"),
            UserWarning,
            stacklevel=3,
        )
    return (result, n) if return_count else result
