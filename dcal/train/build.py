"""Builders named by a config's ``model.name`` and ``data.name``.

Models: ``dcal_vit`` (:class:`dcal.models.DCALViT`, keys = :class:`dcal.models.DCALConfig`
fields), ``bev`` (:class:`dcal.models.BEVGraphModule` between a 1x1 input projection and a 1x1
per-cell classifier), ``mlp`` (a two-layer perceptron on the flattened input: a baseline and the
small model of the tests). ``num_classes``, ``img_size`` and ``in_channels`` default to the data's.
Models trained with a loss that couples the batch (exact accumulation, :mod:`dcal.train.coupled`):
``clip`` (:class:`dcal.models.CLIP`, keys = :class:`dcal.models.CLIPConfig` fields; contrastive),
``open_clip`` (``open_clip.create_model(arch, pretrained=None, **other keys)``: random weights,
nothing downloaded; contrastive), ``protonet`` (:class:`dcal.models.ProtoNet`: ``hidden``,
``depth``, ``backbone``; episodic, with the VIC weights ``vic_weight``, ``variance``,
``invariance``, ``covariance``).

Data: ``synthetic`` (the embedded fine-grained set), ``folder`` = ``imagefolder``
(``root/train/<class>/...`` and ``root/val/<class>/...``), ``cub`` (CUB-200-2011 folder), ``cars``
(Stanford Cars devkit), ``aircraft`` (FGVC-Aircraft release), ``bev_synthetic``,
``synthetic_captions`` (coloured shapes with captions; zero-shot accuracy), ``synthetic_fewshot``
(N-way K-shot Q-query episodes of synthetic classes, validation on novel classes), ``episodes``
(episodes over an ``imagefolder``: ``root/train`` and ``root/val`` hold disjoint classes).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

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
    eval_fn: Optional[Callable] = None  # Trainer's eval_fn(model, x, y) -> (sum, count)


# ----------------------------------------------------------------------------- data


EPISODE_KEYS = {"n_way": 5, "k_shot": 5, "q_query": 15, "episodes_per_epoch": 100, "val_episodes": 50}


def _episodes(train, val, a, seed, facts):
    from dcal.train.episodes import Episodes

    ep = {k: a[k] for k in ("n_way", "k_shot", "q_query")}
    try:
        tr = Episodes(train, episodes=a["episodes_per_epoch"], seed=seed, **ep)
        # validation: the same episodes every epoch (novel classes)
        va = Episodes(val, episodes=a["val_episodes"], seed=seed + 1, fixed=True, **ep)
    except ValueError as e:
        raise ValueError(f"data.{e}") from None
    return tr, va, {**facts, **ep}


def build_data(spec: Dict[str, Any], seed: int, tokenizer=None) -> Tuple[Any, Any, Dict[str, Any]]:
    """(train set, val set, facts the model builder may default from). ``tokenizer``: the
    model's, for caption data (None: the data's own word tokenizer)."""
    kw = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name == "synthetic_captions":
        allowed = {"img_size": 32, "num_colours": 4, "num_shapes": 3, "train_size": 4000, "val_size": 600,
                   "noise": 0.05, "context_length": 12}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        common = dict(img_size=a["img_size"], num_colours=a["num_colours"], num_shapes=a["num_shapes"], seed=seed,
                      noise=a["noise"], context_length=a["context_length"], tokenizer=tokenizer)
        train = D.SyntheticCaptions(a["train_size"], split="train", **common)
        val = D.SyntheticCaptions(a["val_size"], split="val", **common)
        return train, val, {"num_classes": train.num_classes, "img_size": a["img_size"],
                            "vocab_size": getattr(train.tokenizer, "vocab_size", None),
                            "context_length": a["context_length"], "class_tokens": val.class_tokens()}
    if name == "synthetic_fewshot":
        allowed = {"img_size": 20, "cell": 3, "train_classes": 64, "val_classes": 16, "per_class": 30,
                   "noise": 0.08, **EPISODE_KEYS}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        common = dict(img_size=a["img_size"], cell=a["cell"], per_class=a["per_class"], noise=a["noise"], seed=seed)
        train = D.SyntheticFewShot(a["train_classes"], first_class=0, **common)
        val = D.SyntheticFewShot(a["val_classes"], first_class=a["train_classes"], **common)
        return _episodes(train, val, a, seed, {"img_size": a["img_size"], "in_chans": 3})
    if name == "episodes":
        allowed = {"root": None, "resize": 92, "crop": 84, **EPISODE_KEYS}
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        if not isinstance(a["root"], str):
            raise ValueError("data.root is required for data.name='episodes' (root/train, root/val class folders)")
        import os

        train = D.image_folder(os.path.join(a["root"], "train"), D.ImageTransform(True, a["resize"], a["crop"]), seed)
        val = D.image_folder(os.path.join(a["root"], "val"), D.ImageTransform(False, a["resize"], a["crop"]), seed)
        return _episodes(train, val, a, seed, {"img_size": a["crop"], "in_chans": 3})
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
    if name in D.IMAGE_DATASETS:
        allowed = {"root": None, "resize": 550, "crop": 448}
        if name == "aircraft":
            allowed.update(annotation="variant", train_split="trainval", val_split="test")
        check_kwargs("data", kw, allowed)
        a = {**allowed, **kw}
        if not isinstance(a["root"], str):
            raise ValueError(f"data.root is required for data.name={name!r} (the dataset's folder)")
        tr = D.ImageTransform(True, a["resize"], a["crop"])
        ev = D.ImageTransform(False, a["resize"], a["crop"])
        options = {k: a[k] for k in ("annotation", "train_split", "val_split") if k in a}
        for key in ("train_split", "val_split"):
            if key in options and options[key] not in ("train", "val", "trainval", "test"):
                raise ValueError(f"data.{key} must be train, val, trainval or test, got {options[key]!r}")
        train, val = D.image_dataset_splits(name, a["root"], tr, ev, seed, **options)
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
    raise ValueError(f"unknown data.name {name!r}; expected synthetic, folder (= imagefolder), cub, cars, aircraft, "
                     "bev_synthetic, synthetic_captions, synthetic_fewshot or episodes")


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


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ValueError("model.name 'open_clip' needs the open_clip_torch package (pip install open_clip_torch)") from None
    return open_clip


def build_task(cfg, seed: int = 0) -> Task:
    """Model factory, loss and datasets of a :class:`dcal.train.config.Config`."""
    kw = {k: v for k, v in cfg.model.items() if k != "name"}
    name = cfg.model["name"]
    tokenizer = None
    if name == "open_clip":
        ctx = (kw.get("text_cfg") or {}).get("context_length") if isinstance(kw.get("text_cfg"), dict) else None
        tokenizer = _open_clip().get_tokenizer(kw.get("arch", "ViT-B-32"), context_length=ctx)
    train_set, val_set, facts = build_data(cfg.data, seed, tokenizer=tokenizer)
    kind = "captions" if "class_tokens" in facts else "episodes" if "n_way" in facts else "samples"
    want = {"clip": "captions", "open_clip": "captions", "protonet": "episodes"}.get(name, "samples")
    if kind != want:
        raise ValueError(f"model.name {name!r} does not train on data.name {cfg.data['name']!r}: contrastive models "
                         "(clip, open_clip) take synthetic_captions, protonet takes episodes (synthetic_fewshot, "
                         "episodes), the others samples")
    if name == "clip":
        from dcal.models import CLIP, CLIPConfig
        from dcal.train.coupled import ClipLoss, ZeroShotAccuracy

        allowed = {f.name for f in dataclasses.fields(CLIPConfig)}
        check_kwargs("model", kw, allowed)
        for key in ("img_size", "vocab_size", "context_length"):
            if facts.get(key) is not None:
                kw.setdefault(key, facts[key])
        try:
            CLIPConfig(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model: {e}") from None
        return Task(lambda: CLIP(CLIPConfig(**kw)), ClipLoss(), train_set, val_set,
                    ZeroShotAccuracy(facts["class_tokens"]))
    if name == "open_clip":
        from dcal.train.coupled import ClipLoss, ZeroShotAccuracy

        open_clip = _open_clip()
        arch = kw.pop("arch", "ViT-B-32")
        if arch not in open_clip.list_models():
            raise ValueError(f"model.arch {arch!r} is not an open_clip architecture")

        def make():
            return open_clip.create_model(arch, pretrained=None, **kw)

        return Task(make, ClipLoss(), train_set, val_set, ZeroShotAccuracy(facts["class_tokens"]))
    if name == "protonet":
        from dcal.models import ProtoNet
        from dcal.train.coupled import EpisodeAccuracy, PrototypicalLoss

        loss_keys = {"vic_weight": 0.1, "variance": 1.0, "invariance": 1.0, "covariance": 0.04}
        check_kwargs("model", kw, {"hidden", "depth", "backbone", *loss_keys})
        lk = {k: kw.pop(k, v) for k, v in loss_keys.items()}
        loss = PrototypicalLoss(facts["n_way"], facts["k_shot"], facts["q_query"], **lk)
        try:
            ProtoNet(in_chans=facts["in_chans"], **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model: {e}") from None
        return Task(lambda: ProtoNet(in_chans=facts["in_chans"], **kw), loss, train_set, val_set, EpisodeAccuracy(loss))
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
