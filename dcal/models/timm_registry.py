"""DCAL ViTs in timm's model registry: ``timm.create_model("dcal_vit_base_patch16_448", num_classes=200)``.

Registered with timm whenever both are loaded, in either order (timm stays optional): at
``import dcal.models`` when timm is already imported, else right after ``import timm`` (a
post-import hook), so ``import dcal.models`` does not pay for importing timm (seconds: timm
imports torchvision and torch._dynamo).
Keyword arguments are :class:`DCALConfig` fields (``img_size``, ``num_classes``, ``depth``,
``drop_path_rate``, ``glca_ratio``, ``ablation``, ``backend`` ...) plus timm's ``in_chans`` and
``device``; others raise naming them. Nothing is downloaded: ``pretrained=True`` needs a local
timm ViT checkpoint, ``pretrained_cfg_overlay=dict(file="vit.safetensors")`` (any image size; see
:meth:`DCALViT.load_timm`).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import sys

import torch

from dcal.models.dcal_vit import DCALConfig, DCALViT

ARCHS = {
    "dcal_vit_base_patch16_448": dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "dcal_vit_small_patch16_448": dict(img_size=448, patch_size=16, embed_dim=384, depth=12, num_heads=6),
}
_FIELDS = {f.name for f in dataclasses.fields(DCALConfig)}
_TIMM_ONLY = ("pretrained_cfg", "cache_dir")


def build(arch: str, pretrained: bool = False, pretrained_cfg_overlay=None, device=None, **kwargs) -> DCALViT:
    """The model ``arch`` (a key of ARCHS) with ``kwargs`` overriding its config."""
    for k in _TIMM_ONLY:
        kwargs.pop(k, None)
    drop = kwargs.pop("drop_rate", 0.0)
    if drop:
        raise ValueError(f"drop_rate={drop}: the DCAL ViT has no dropout before its heads; use drop_path_rate")
    pool = kwargs.pop("global_pool", "token")
    if pool != "token":
        raise ValueError(f"global_pool={pool!r}: the DCAL ViT reads the class token (global_pool='token')")
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise TypeError(f"{arch}: unknown arguments {unknown}; expected DCALConfig fields {sorted(_FIELDS)}")
    config = DCALConfig(**{**ARCHS[arch], **kwargs})
    with torch.device(device) if device is not None else _nullcontext():
        model = DCALViT(config)
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=arch,
        input_size=(config.in_chans, config.img_size, config.img_size),
        interpolation="bicubic",
        crop_pct=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_classes=config.num_classes,
        first_conv="patch_embed.proj",
        classifier="head",
    )
    if pretrained:
        path = (pretrained_cfg_overlay or {}).get("file")
        if not path:
            raise ValueError(
                f"{arch} has no released weights and nothing is downloaded: pass a local timm ViT "
                f"checkpoint as pretrained_cfg_overlay=dict(file=path)"
            )
        model.load_timm(path)
    return model


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


REGISTERED = False


def _register() -> bool:
    """Register the DCAL ViTs with timm (imported here if it is not yet); once."""
    global REGISTERED
    if REGISTERED:
        return True
    if importlib.util.find_spec("timm") is None:
        return False
    from timm.models import register_model

    for arch in ARCHS:

        def entry(pretrained: bool = False, _arch=arch, **kwargs) -> DCALViT:
            return build(_arch, pretrained=pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = arch
        entry.__module__ = __name__
        globals()[arch] = entry
        register_model(entry)
    REGISTERED = True
    return True


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """At the first ``import timm``: timm's own spec, with a loader that runs timm's module and
    then registers the DCAL ViTs. Removes itself from sys.meta_path when used."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        _uninstall()
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


class _RegisterAfter(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


_HOOK = _AfterTimmImport()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


if "timm" in sys.modules:
    _register()
elif importlib.util.find_spec("timm") is not None:
    sys.meta_path.insert(0, _HOOK)
