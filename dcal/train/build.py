"""Builders named by a config's ``model.name`` and ``data.name``.

Models: ``dcal_vit`` (:class:`dcal.models.DCALViT`, keys = :class:`dcal.models.DCALConfig`
fields), ``bev`` (:class:`dcal.models.BEVGraphModule` between a 1x1 input projection and a 1x1
per-cell classifier), ``mlp`` (a two-layer perceptron on the flattened input: a baseline and the
small model of the tests). ``num_classes``, ``img_size`` and ``in_channels`` default to the data's.

Data: ``synthetic`` (the embedded fine-grained set), ``cub`` (CUB-200-2011 folder), ``imagefolder``
(``root/train/<class>/...`` and ``root/val/<class>/...``), ``bev_synthetic``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dcal.train import data as D
from dcal.train.config import check_kwargs


@dataclasses.dataclass
class Task:
    model_factory: Callable[[], nn.Module]
    loss: Callable  # None: the model's own ``loss`` method
    train_set: Any
    val_set: Any


# ----------------------------------------------------------------------------- data


def build_data(spec: Dict[str, Any], seed: int) -> Tuple[Any, Any, Dict[str, Any]]:
    """(train set, val set, facts the model builder may default from)."""
    kw = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name == "synthetic":
        allowed = {"img_size": 64, "num_classes": 10, "train_size": 2000, "val_size": 500, "detail": None,
                   "noise": 0.08}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        common = dict(img_size=a["img_size"], num_classes=a["num_classes"], detail=a["detail"], seed=seed,
                      noise=a["noise"])
        train = D.SyntheticFineGrained(a["train_size"], split="train", **common)
        val = D.SyntheticFineGrained(a["val_size"], split="val", **common)
        return train, val, {"num_classes": a["num_classes"], "img_size": a["img_size"], "in_shape": (3, a["img_size"], a["img_size"])}
    if name in ("cub", "imagefolder"):
        allowed = {"root": None, "resize": 550, "crop": 448}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        if not isinstance(a["root"], str):
            raise ValueError(f"data.root is required for data.name={name!r} (the dataset's folder)")
        tr = D.ImageTransform(True, a["resize"], a["crop"])
        ev = D.ImageTransform(False, a["resize"], a["crop"])
        if name == "cub":
            train, val = D.cub200(a["root"], "train", tr, seed), D.cub200(a["root"], "test", ev, seed)
        else:
            import os

            train = D.image_folder(os.path.join(a["root"], "train"), tr, seed)
            val = D.image_folder(os.path.join(a["root"], "val"), ev, seed)
        return train, val, {"num_classes": train.num_classes, "img_size": a["crop"], "in_shape": (3, a["crop"], a["crop"])}
    if name == "bev_synthetic":
        allowed = {"map_size": [32, 32], "in_channels": 4, "window": 5, "density": 0.05, "train_size": 512,
                   "val_size": 128}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        if not (isinstance(a["map_size"], (list, tuple)) and len(a["map_size"]) == 2):
            raise ValueError(f"data.map_size must be [X, Y], got {a['map_size']!r}")
        common = dict(map_size=a["map_size"], in_channels=a["in_channels"], window=a["window"], density=a["density"],
                      seed=seed)
        train = D.SyntheticBEV(a["train_size"], split="train", **common)
        val = D.SyntheticBEV(a["val_size"], split="val", **common)
        return train, val, {"num_classes": 3, "in_channels": a["in_channels"],
                            "in_shape": (a["in_channels"], *a["map_size"])}
    raise ValueError(f"unknown data.name {name!r}; expected synthetic, cub, imagefolder or bev_synthetic")


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Flatten -> Linear -> GELU -> Linear: no batch-dependent layer (exact accumulation)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))


class BEVSegmenter(nn.Module):
    """Per-cell classification of a BEV map: 1x1 projection to ``channels``, the
    :class:`dcal.models.BEVGraphModule` stack, 1x1 classifier. [B, Cin, X, Y] -> [B, classes, X, Y]."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, **bev_kwargs):
        super().__init__()
        from dcal.models import BEVGraphModule

        self.proj = nn.Conv2d(in_channels, channels, 1)
        self.body = BEVGraphModule(channels, **bev_kwargs)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.body, "set_grad_checkpointing"):
            self.body.set_grad_checkpointing(enable)

    def forward(self, x):
        return self.head(self.body(self.proj(x)))


def cross_entropy(outputs, target):
    return F.cross_entropy(outputs.float(), target)


def build_task(cfg, seed: int = 0) -> Task:
    """Model factory, loss and datasets of a :class:`dcal.train.config.Config`."""
    train_set, val_set, facts = build_data(cfg.data, seed)
    kw = {k: v for k, v in cfg.model.items() if k != "name"}
    name = cfg.model["name"]
    if name == "dcal_vit":
        from dcal.models import DCALConfig, DCALViT

        allowed = {f.name for f in dataclasses.fields(DCALConfig)}
        check_kwargs("model", kw, allowed)
        for key in ("num_classes", "img_size"):
            if key in allowed and key in facts:
                kw.setdefault(key, facts[key])
        try:
            DCALConfig(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model: {e}") from None
        return Task(lambda: DCALViT(DCALConfig(**kw)), None, train_set, val_set)
    if name == "bev":
        from dcal.models import BEVGraphModule

        sig = inspect.signature(BEVGraphModule.__init__)
        allowed = {p for p in sig.parameters if p not in ("self", "channels")} | {"channels", "in_channels",
                                                                                  "num_classes"}
        check_kwargs("model", kw, allowed)
        kw.setdefault("in_channels", facts.get("in_channels", 4))
        kw.setdefault("num_classes", facts["num_classes"])
        return Task(lambda: BEVSegmenter(**kw), cross_entropy, train_set, val_set)
    if name == "mlp":
        check_kwargs("model", kw, {"hidden", "num_classes"})
        in_features = 1
        for s in facts["in_shape"]:
            in_features *= s
        if "map_size" in cfg.data or cfg.data["name"] == "bev_synthetic":
            raise ValueError("model.name 'mlp' classifies whole images; it does not take data.name 'bev_synthetic'")
        nc = kw.get("num_classes", facts["num_classes"])
        hidden = kw.get("hidden", 64)
        return Task(lambda: MLP(in_features, nc, hidden), cross_entropy, train_set, val_set)
    raise ValueError(f"unknown model.name {name!r}; expected dcal_vit, bev or mlp")
