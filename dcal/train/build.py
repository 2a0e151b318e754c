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

import copy
import dataclasses
import inspect
import re
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
    pretrained: Optional[str] = None  # model.pretrained: weights loaded into a fresh model (dcal.train.pretrained)
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what the data told the model builder


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataBuilder:
    """One ``data.name``: its keys with their defaults, the kind of data it gives (``KINDS``) and
    ``build(a, seed, tokenizer, name) -> (train set, val set, facts)``, where ``a`` holds every
    key (the config's values over the defaults)."""

    keys: Dict[str, Any]
    kind: str
    build: Callable[..., Tuple[Any, Any, Dict[str, Any]]]


# what a kind of data holds (the models of each kind train on nothing else)
KINDS = {
    "samples": "labelled images",
    "maps": "BEV maps labelled per cell",
    "captions": "images with captions",
    "episodes": "few-shot episodes",
}

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


def _synthetic_captions(a, seed, tokenizer, name):
    common = dict(
        img_size=a["img_size"],
        num_colours=a["num_colours"],
        num_shapes=a["num_shapes"],
        seed=seed,
        noise=a["noise"],
        context_length=a["context_length"],
        tokenizer=tokenizer,
    )
    train = D.SyntheticCaptions(a["train_size"], split="train", **common)
    val = D.SyntheticCaptions(a["val_size"], split="val", **common)
    facts = {
        "num_classes": train.num_classes,
        "img_size": a["img_size"],
        "vocab_size": getattr(train.tokenizer, "vocab_size", None),
        "context_length": a["context_length"],
        "class_tokens": val.class_tokens(),
    }
    return train, val, facts


def _synthetic_fewshot(a, seed, tokenizer, name):
    common = dict(img_size=a["img_size"], cell=a["cell"], per_class=a["per_class"], noise=a["noise"], seed=seed)
    train = D.SyntheticFewShot(a["train_classes"], first_class=0, **common)
    val = D.SyntheticFewShot(a["val_classes"], first_class=a["train_classes"], **common)
    return _episodes(train, val, a, seed, {"img_size": a["img_size"], "in_chans": 3})


def _folder_episodes(a, seed, tokenizer, name):
    import os

    if not isinstance(a["root"], str):
        raise ValueError("data.root is required for data.name='episodes' (root/train, root/val class folders)")
    train = D.image_folder(os.path.join(a["root"], "train"), D.ImageTransform(True, a["resize"], a["crop"]), seed)
    val = D.image_folder(os.path.join(a["root"], "val"), D.ImageTransform(False, a["resize"], a["crop"]), seed)
    return _episodes(train, val, a, seed, {"img_size": a["crop"], "in_chans": 3})


def _synthetic(a, seed, tokenizer, name):
    common = dict(img_size=a["img_size"], num_classes=a["num_classes"], detail=a["detail"], seed=seed, noise=a["noise"])
    train = D.SyntheticFineGrained(a["train_size"], split="train", **common)
    val = D.SyntheticFineGrained(a["val_size"], split="val", **common)
    facts = {"num_classes": a["num_classes"], "img_size": a["img_size"], "in_shape": (3, a["img_size"], a["img_size"])}
    return train, val, facts


SPLITS = ("train", "val", "trainval", "test")


def _image_dataset(a, seed, tokenizer, name):
    if not isinstance(a["root"], str):
        raise ValueError(f"data.root is required for data.name={name!r} (the dataset's folder)")
    tr = D.ImageTransform(True, a["resize"], a["crop"])
    ev = D.ImageTransform(False, a["resize"], a["crop"])
    options = {k: a[k] for k in ("annotation", "train_split", "val_split") if k in a}
    for key in ("train_split", "val_split"):
        if key in options and options[key] not in SPLITS:
            raise ValueError(f"data.{key} must be {', '.join(SPLITS[:-1])} or {SPLITS[-1]}, got {options[key]!r}")
    train, val = D.image_dataset_splits(name, a["root"], tr, ev, seed, **options)
    facts = {"num_classes": train.num_classes, "img_size": a["crop"], "in_shape": (3, a["crop"], a["crop"])}
    return train, val, facts


def _bev_synthetic(a, seed, tokenizer, name):
    if not (isinstance(a["map_size"], (list, tuple)) and len(a["map_size"]) == 2):
        raise ValueError(f"data.map_size must be [X, Y], got {a['map_size']!r}")
    common = dict(
        map_size=a["map_size"], in_channels=a["in_channels"], window=a["window"], density=a["density"], seed=seed
    )
    train = D.SyntheticBEV(a["train_size"], split="train", **common)
    val = D.SyntheticBEV(a["val_size"], split="val", **common)
    facts = {"num_classes": 3, "in_channels": a["in_channels"], "in_shape": (a["in_channels"], *a["map_size"])}
    return train, val, facts


_IMAGE_KEYS = {"root": None, "resize": 550, "crop": 448}
_AIRCRAFT_KEYS = {**_IMAGE_KEYS, **D.AIRCRAFT_OPTIONS}

# data.name -> builder; every name and error message about data names comes from this table
DATA_BUILDERS: Dict[str, DataBuilder] = {
    "synthetic": DataBuilder(
        {"img_size": 64, "num_classes": 10, "train_size": 2000, "val_size": 500, "detail": None, "noise": 0.08},
        "samples",
        _synthetic,
    ),
    **{
        name: DataBuilder(_AIRCRAFT_KEYS if name == "aircraft" else _IMAGE_KEYS, "samples", _image_dataset)
        for name in D.IMAGE_DATASETS
    },
    "bev_synthetic": DataBuilder(
        {"map_size": [32, 32], "in_channels": 4, "window": 5, "density": 0.05, "train_size": 512, "val_size": 128},
        "maps",
        _bev_synthetic,
    ),
    "synthetic_captions": DataBuilder(
        {
            "img_size": 32,
            "num_colours": 4,
            "num_shapes": 3,
            "train_size": 4000,
            "val_size": 600,
            "noise": 0.05,
            "context_length": 12,
        },
        "captions",
        _synthetic_captions,
    ),
    "synthetic_fewshot": DataBuilder(
        {
            "img_size": 20,
            "cell": 3,
            "train_classes": 64,
            "val_classes": 16,
            "per_class": 30,
            "noise": 0.08,
            **EPISODE_KEYS,
        },
        "episodes",
        _synthetic_fewshot,
    ),
    "episodes": DataBuilder({"root": None, "resize": 92, "crop": 84, **EPISODE_KEYS}, "episodes", _folder_episodes),
}


def data_builder(name) -> DataBuilder:
    """The registry entry of ``data.name``; a ValueError listing every name when there is none."""
    if name not in DATA_BUILDERS:
        raise ValueError(f"unknown data.name {name!r}; expected one of {', '.join(sorted(DATA_BUILDERS))}")
    return DATA_BUILDERS[name]


def build_data(spec: Dict[str, Any], seed: int, tokenizer=None) -> Tuple[Any, Any, Dict[str, Any]]:
    """(train set, val set, facts the model builder may default from). ``tokenizer``: the
    model's, for caption data (None: the data's own word tokenizer)."""
    kw = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    entry = data_builder(name)
    check_kwargs("data", kw, entry.keys)
    return entry.build({**copy.deepcopy(entry.keys), **kw}, seed, tokenizer, name)


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
        raise ValueError(
            "model.name 'open_clip' needs the open_clip_torch package (pip install open_clip_torch)"
        ) from None
    return open_clip


def _model_error(e: Exception) -> ValueError:
    """A model constructor's complaint as ``model.<field> ...`` when it starts with a field name."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.match(r"^([a-z_]+)\b", msg)
    return ValueError(f"model.{msg}" if m and m.group(1) not in ("got", "the", "a", "an") else f"model: {msg}")


def _data_error(e: Exception, data: Dict[str, Any]) -> ValueError:
    """A dataset's complaint as one line naming ``data.<key>``."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if re.search(r"\bdata[.:]", msg):
        return ValueError(msg)
    m = re.match(r"^([a-z_]+)\b", msg)
    if m and (m.group(1) in data or "_" in m.group(1)):
        return ValueError(f"data.{msg}")
    if "root" in data:
        return ValueError(f"data.root: {msg}")
    return ValueError(f"data: {msg}")


def _set_default(kw: Dict[str, Any], key: str, value, data_key: str) -> None:
    """``kw[key]`` from the data unless the model section sets it; when both do, they must agree."""
    if value is None:
        return
    if key in kw and kw[key] != value:
        raise ValueError(
            f"model.{key} is {kw[key]!r} but the data gives {value!r} ({data_key}); "
            f"leave model.{key} out to take the data's, or make them equal"
        )
    kw.setdefault(key, value)


def _data_key(cfg, key: str) -> str:
    return f"data.{key}" if key in cfg.data else f"data.name {cfg.data['name']!r}"


# ----------------------------------------------------------------------------- model keys
#
# The keys each model takes, with their defaults (None: anything), checked before any data is read.


def _fields(config_class) -> Dict[str, Any]:
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(config_class)
    }


def _clip_keys():
    from dcal.models import CLIPConfig

    return _fields(CLIPConfig)


def _dcal_vit_keys():
    from dcal.models import DCALConfig

    return _fields(DCALConfig)


PROTONET_LOSS_KEYS = {"vic_weight": 0.1, "variance": 1.0, "invariance": 1.0, "covariance": 0.04}


def _protonet_keys():
    return {"hidden": None, "depth": None, "backbone": None, **PROTONET_LOSS_KEYS}


def _bev_keys():
    from dcal.models import BEVGraphModule

    sig = inspect.signature(BEVGraphModule.__init__)
    allowed = {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.name not in ("self", "channels")
    }
    return {**allowed, "channels": 64, "in_channels": None, "num_classes": None}


def _mlp_keys():
    return {"hidden": 64, "num_classes": None}


# ----------------------------------------------------------------------------- model builders


def _build_clip(kw, facts, cfg, train_set, val_set) -> Task:
    from dcal.models import CLIP, CLIPConfig
    from dcal.train.coupled import ClipLoss, ZeroShotAccuracy

    for key in ("img_size", "vocab_size", "context_length"):
        _set_default(kw, key, facts.get(key), _data_key(cfg, key))
    try:
        CLIPConfig(**kw)
    except (TypeError, ValueError) as e:
        raise _model_error(e) from None
    return Task(lambda: CLIP(CLIPConfig(**kw)), ClipLoss(), train_set, val_set, ZeroShotAccuracy(facts["class_tokens"]))


def _open_clip_tokenizer(kw):
    open_clip = _open_clip()
    arch = kw.get("arch", "ViT-B-32")
    if arch not in open_clip.list_models():
        raise ValueError(f"model.arch {arch!r} is not an open_clip architecture")
    ctx = (kw.get("text_cfg") or {}).get("context_length") if isinstance(kw.get("text_cfg"), dict) else None
    return open_clip.get_tokenizer(arch, context_length=ctx)


def _build_open_clip(kw, facts, cfg, train_set, val_set) -> Task:
    from dcal.train.coupled import ClipLoss, ZeroShotAccuracy

    open_clip = _open_clip()
    arch = kw.pop("arch", "ViT-B-32")

    def make():
        return open_clip.create_model(arch, pretrained=None, **kw)

    return Task(make, ClipLoss(), train_set, val_set, ZeroShotAccuracy(facts["class_tokens"]))


def _build_protonet(kw, facts, cfg, train_set, val_set) -> Task:
    from dcal.models import ProtoNet
    from dcal.train.coupled import EpisodeAccuracy, PrototypicalLoss

    lk = {k: kw.pop(k, v) for k, v in PROTONET_LOSS_KEYS.items()}
    loss = PrototypicalLoss(facts["n_way"], facts["k_shot"], facts["q_query"], **lk)
    try:
        ProtoNet(in_chans=facts["in_chans"], **kw)
    except (TypeError, ValueError) as e:
        raise _model_error(e) from None
    return Task(lambda: ProtoNet(in_chans=facts["in_chans"], **kw), loss, train_set, val_set, EpisodeAccuracy(loss))


def _build_dcal_vit(kw, facts, cfg, train_set, val_set) -> Task:
    from dcal.models import DCALConfig, DCALViT

    _set_default(kw, "num_classes", facts.get("num_classes"), _data_key(cfg, "num_classes"))
    _set_default(
        kw, "img_size", facts.get("img_size"), _data_key(cfg, "img_size" if "img_size" in cfg.data else "crop")
    )
    if "logvar_clamp" in kw and isinstance(kw["logvar_clamp"], list):
        kw["logvar_clamp"] = tuple(kw["logvar_clamp"])
    try:
        DCALConfig(**kw)
    except (TypeError, ValueError) as e:
        raise _model_error(e) from None
    return Task(lambda: DCALViT(DCALConfig(**kw)), None, train_set, val_set)


def _build_timm(kw, facts, cfg, train_set, val_set) -> Task:
    """Any timm ViT by name (``model.timm_name``), random weights (``model.pretrained`` loads
    weights from disk), every timm ``Attention`` swapped for the fused one (:func:`dcal.nn.fuse_attention`).
    Other keys go to ``timm.create_model`` (``drop_path_rate``, ``patch_size``, ``embed_dim``, ...)."""
    try:
        import timm
    except ImportError:
        raise ValueError("model.name 'timm' needs the timm package (pip install timm)") from None
    name = kw.pop("timm_name", None)
    if not isinstance(name, str):
        raise ValueError(
            f"model.timm_name is required for model.name 'timm' (a timm ViT such as "
            f"'vit_base_patch16_224'), got {name!r}"
        )
    if name not in timm.list_models():
        import difflib

        close = difflib.get_close_matches(name, timm.list_models("*vit*"), n=3)
        raise ValueError(
            f"model.timm_name {name!r} is not a timm model{'; close: ' + ', '.join(close) if close else ''}"
        )
    backend = kw.pop("backend", None)
    if "pretrained_cfg_overlay" in kw:
        raise ValueError("model.pretrained_cfg_overlay: nothing is downloaded; use model.pretrained: PATH")
    user_keys = set(kw)
    _set_default(kw, "num_classes", facts.get("num_classes"), _data_key(cfg, "num_classes"))
    _set_default(
        kw, "img_size", facts.get("img_size"), _data_key(cfg, "img_size" if "img_size" in cfg.data else "crop")
    )

    def make():
        from dcal.nn import fuse_attention

        m = timm.create_model(name, pretrained=False, **kw)
        return fuse_attention(m, backend=backend)

    try:
        with torch.device("meta"):
            probe = make()
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m and m.group(1) not in user_keys:
            raise ValueError(
                f"model.timm_name {name!r} is not a ViT (it takes no {m.group(1)}); model.name 'timm' "
                f"takes timm ViTs (vit_*, deit_*, ...)"
            ) from None
        if m:
            raise ValueError(f"unknown key model.{m.group(1)}: timm's {name} does not take it") from None
        raise _model_error(e) from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(
            f"model: timm's {name} refuses the model keys ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from None
    from dcal.nn import PWCAAttention

    if not any(isinstance(m, PWCAAttention) for m in probe.modules()):
        raise ValueError(
            f"model.timm_name {name!r} has no attention that dcal fuses (expected a timm ViT "
            f"built from timm's Attention)"
        )
    return Task(make, cross_entropy, train_set, val_set)


def _build_bev(kw, facts, cfg, train_set, val_set) -> Task:
    _set_default(kw, "in_channels", facts["in_channels"], _data_key(cfg, "in_channels"))
    _set_default(kw, "num_classes", facts["num_classes"], _data_key(cfg, "name"))
    try:
        with torch.device("meta"):
            BEVSegmenter(**kw)
    except (TypeError, ValueError, AssertionError) as e:
        raise _model_error(e) from None
    return Task(lambda: BEVSegmenter(**kw), cross_entropy, train_set, val_set)


def _build_mlp(kw, facts, cfg, train_set, val_set) -> Task:
    in_features = 1
    for s in facts["in_shape"]:
        in_features *= s
    _set_default(kw, "num_classes", facts["num_classes"], _data_key(cfg, "num_classes"))
    nc, hidden = kw["num_classes"], kw.get("hidden", 64)
    if hidden < 1:
        raise ValueError(f"model.hidden must be an integer >= 1, got {hidden!r}")
    return Task(lambda: MLP(in_features, nc, hidden), cross_entropy, train_set, val_set)


@dataclasses.dataclass(frozen=True)
class ModelBuilder:
    """One ``model.name``: ``build(model keys, data facts, config, train set, val set) -> Task``,
    the kind of data it trains on (a key of ``KINDS``) and ``keys() -> {key: default}``, the keys
    it takes (None: any, handed on to another library's constructor, which judges them);
    ``tokenizer(model keys)``: the model's own tokenizer for caption data (None: the data's)."""

    build: Callable[..., Task]
    data: str = "samples"
    keys: Optional[Callable[[], Dict[str, Any]]] = None
    tokenizer: Optional[Callable[[Dict[str, Any]], Any]] = None  # model keys -> the tokenizer its captions need


# model.name -> builder; every name and error message about model names comes from this table.
# Contrastive models train on captions, protonet on episodes, bev labels the cells of maps.
MODEL_BUILDERS: Dict[str, ModelBuilder] = {
    "dcal_vit": ModelBuilder(_build_dcal_vit, keys=_dcal_vit_keys),
    "timm": ModelBuilder(_build_timm),
    "bev": ModelBuilder(_build_bev, data="maps", keys=_bev_keys),
    "mlp": ModelBuilder(_build_mlp, keys=_mlp_keys),
    "clip": ModelBuilder(_build_clip, data="captions", keys=_clip_keys),
    "open_clip": ModelBuilder(_build_open_clip, data="captions", tokenizer=_open_clip_tokenizer),
    "protonet": ModelBuilder(_build_protonet, data="episodes", keys=_protonet_keys),
}


def model_builder(name) -> ModelBuilder:
    """The registry entry of ``model.name``; a ValueError listing every name when there is none."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model.name {name!r}; expected one of {', '.join(sorted(MODEL_BUILDERS))}")
    return MODEL_BUILDERS[name]


def _check_pairing(model_name: str, data_name: str) -> None:
    """The model trains on the kind of data that ``data.name`` gives (both read from the tables)."""
    want, got = MODEL_BUILDERS[model_name].data, DATA_BUILDERS[data_name].kind
    if want == got:
        return
    fits = [d for d, b in DATA_BUILDERS.items() if b.kind == want]
    takers = [m for m, b in MODEL_BUILDERS.items() if b.data == got]
    raise ValueError(
        f"model.name {model_name!r} does not train on data.name {data_name!r}: it takes {KINDS[want]} "
        f"(data.name {', '.join(fits)}); {data_name} gives {KINDS[got]} (for model.name {', '.join(takers)})"
    )


def build_task(cfg, seed: int = 0, weights_from_checkpoint: bool = False) -> Task:
    """Model factory, loss and datasets of a :class:`dcal.train.config.Config`. Every check that
    needs no data runs first; nothing is built when a key is wrong. ``weights_from_checkpoint``
    (resume, evaluation): ``model.pretrained`` is not needed and not checked."""
    kw = {k: v for k, v in cfg.model.items() if k != "name"}
    name = cfg.model["name"]
    entry = model_builder(name)
    pretrained = kw.pop("pretrained", None)
    if pretrained is not None and not weights_from_checkpoint:
        from dcal.train.pretrained import check_path

        pretrained = check_path(pretrained)
    if entry.keys is not None:
        check_kwargs("model", kw, entry.keys())
    data_builder(cfg.data["name"])
    _check_pairing(name, cfg.data["name"])
    tokenizer = entry.tokenizer(kw) if entry.tokenizer is not None else None
    try:
        train_set, val_set, facts = build_data(cfg.data, seed, tokenizer=tokenizer)
    except (TypeError, ValueError) as e:
        raise _data_error(e, cfg.data) from None
    task = entry.build(kw, facts, cfg, train_set, val_set)
    task.pretrained, task.facts = pretrained, facts
    return task
