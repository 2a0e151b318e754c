"""Training configuration: YAML files with three sections, ``model``, ``data`` and ``train``.

Every key is checked: an unknown key or a bad value raises a ValueError that names the key
(``train.amp``), so a typo in a config never trains silently with a default. ``--set a.b=v``
overrides are parsed as YAML scalars (``--set train.epochs=3``, ``--set train.amp=bf16``).

The ``model`` and ``data`` sections name a builder (``name``); their other keys are that
builder's keyword arguments and are checked by it (see :mod:`dcal.train.__main__`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

import yaml

AMP_MODES = ("none", "fp16", "bf16")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINTING = ("none", "full", "selective")
FSDP_PARAM_DTYPES = (None, "bf16")  # null: parameters stay as they are
DEVICES = ("auto", "cpu", "cuda")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def parse_bytes(value: Union[str, int, float, None], key: str = "max_memory") -> Optional[int]:
    """``"16GB"``, ``"512MiB"``, ``"1.5g"`` or a number of bytes -> bytes (binary units: a GPU
    sold as 16 GB holds 16 GiB). A number without a unit is bytes and must be at least 1 MiB
    (``16`` is a forgotten unit, not a budget). None stays None."""
    if value is None:
        return None
    expected = "a size like '16GB', '200MB' or '512MiB' (a number without a unit is bytes, at least 1 MiB)"
    if isinstance(value, bool):
        raise ValueError(f"{key} must be {expected}, got {value!r}")
    if isinstance(value, (int, float)):
        n, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{key} must be {expected}, got {value!r}")
        n, unit = float(m.group(1)) * _UNITS[m.group(2).lower()], m.group(2)
    if not n > 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    if not unit and n < 2**20:
        raise ValueError(
            f"{key} {value!r} without a unit means {int(n)} bytes; give a unit "
            f"(like {value}GB or {value}MB) or at least 1 MiB"
        )
    return int(n)


@dataclass
class TrainConfig:
    """The ``train`` section: the loop's own settings (see :class:`dcal.train.Trainer`)."""

    epochs: int = 10
    effective_batch: int = 16  # samples per optimiser step, summed over all processes
    micro_batch: Union[int, str] = "auto"  # samples per forward/backward on one process, or "auto"
    max_memory: Optional[str] = None  # budget for micro_batch="auto" ("16GB"); None: device total
    base_lr: float = 5e-4  # lr = base_lr * effective_batch / 512 (DCAL, ViT fine-tuning)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: Optional[float] = 1.0  # max global grad norm; None: no clipping
    amp: str = "none"  # "none" | "fp16" (with GradScaler) | "bf16" (no scaler)
    grad_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    threads: int = 0  # torch intra-op CPU threads; 0: torch's default (1 is faster on a busy machine)
    keep_last: int = 2  # checkpoints kept besides best.pt
    save_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    eval_every: int = 1  # epochs
    find_unused_parameters: bool = False  # DDP: needed when an ablation leaves a head unused
    progress: bool = True
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit); for smoke runs
    strategy: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard per block; see dcal.train.distributed)
    fsdp_param_dtype: Optional[str] = None  # fsdp: null | "bf16" (MixedPrecisionPolicy, fp32 reduce)
    fsdp_checkpointing: str = "none"  # fsdp: "none" | "full" | "selective" (dcal:: ops and matmuls saved)

    def validate(self) -> "TrainConfig":
        def need(key, ok, what):
            if not ok:
                raise ValueError(f"train.{key} must be {what}, got {getattr(self, key)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need("epochs", is_int(self.epochs) and self.epochs >= 1, "an integer >= 1")
        need("effective_batch", is_int(self.effective_batch) and self.effective_batch >= 1, "an integer >= 1")
        need(
            "micro_batch",
            self.micro_batch == "auto" or (is_int(self.micro_batch) and self.micro_batch >= 1),
            "an integer >= 1 or 'auto'",
        )
        if self.max_memory is not None:
            parse_bytes(self.max_memory, "train.max_memory")
        for key in ("base_lr", "min_lr", "weight_decay", "warmup_epochs"):
            need(key, is_num(getattr(self, key)) and getattr(self, key) >= 0, "a number >= 0")
        need(
            "betas",
            isinstance(self.betas, (list, tuple))
            and len(self.betas) == 2
            and all(is_num(b) and 0 <= b < 1 for b in self.betas),
            "two numbers in [0, 1)",
        )
        need(
            "clip_grad",
            self.clip_grad is None or (is_num(self.clip_grad) and self.clip_grad > 0),
            "a number > 0 or null",
        )
        need("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}")
        need("device", self.device in DEVICES, f"one of {DEVICES}")
        for key in ("grad_checkpointing", "find_unused_parameters", "progress"):
            need(key, isinstance(getattr(self, key), bool), "true or false")
        for key in ("seed", "num_workers", "threads", "keep_last", "save_every_steps", "max_steps"):
            need(key, is_int(getattr(self, key)) and getattr(self, key) >= 0, "an integer >= 0")
        need("keep_last", self.keep_last >= 1, "an integer >= 1")
        need("eval_every", is_int(self.eval_every) and self.eval_every >= 1, "an integer >= 1")
        need("strategy", self.strategy in STRATEGIES, f"one of {STRATEGIES}")
        need(
            "fsdp_param_dtype",
            self.fsdp_param_dtype in FSDP_PARAM_DTYPES,
            " or ".join("null" if v is None else repr(v) for v in FSDP_PARAM_DTYPES),
        )
        need("fsdp_checkpointing", self.fsdp_checkpointing in CHECKPOINTING, f"one of {CHECKPOINTING}")
        if self.strategy == "fsdp":
            need(
                "amp",
                self.amp != "fp16",
                "'none' or 'bf16' with strategy fsdp (fp16's GradScaler does not see sharded gradients)",
            )
            need(
                "micro_batch",
                self.micro_batch != "auto",
                "a number with strategy fsdp ('auto' predicts unsharded memory)",
            )
            need(
                "grad_checkpointing",
                not self.grad_checkpointing,
                "false with strategy fsdp (use train.fsdp_checkpointing: full or selective)",
            )
        elif self.fsdp_param_dtype is not None or self.fsdp_checkpointing != "none":
            need("strategy", False, "'fsdp' when fsdp_param_dtype or fsdp_checkpointing is set")
        return self


@dataclass
class Config:
    model: Dict[str, Any]
    data: Dict[str, Any]
    train: TrainConfig

    def to_dict(self) -> Dict[str, Any]:
        return {"model": copy.deepcopy(self.model), "data": copy.deepcopy(self.data), "train": asdict(self.train)}


SECTIONS = ("model", "data", "train")


def _apply_set(raw: Dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ValueError(f"--set expects key=value (like train.epochs=3), got {item!r}")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS or not parts[1]:
        raise ValueError(f"--set key {key!r} must be section.name with section one of {SECTIONS}")
    try:
        value = _yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(
            f"--set {key}: cannot parse value {text!r} ({getattr(e, 'problem', None) or 'not YAML'})"
        ) from None
    raw.setdefault(parts[0], {})
    if raw[parts[0]] is None:
        raw[parts[0]] = {}
    raw[parts[0]][parts[1]] = value


def from_dict(raw: Dict[str, Any], overrides: Optional[List[str]] = None) -> Config:
    """A checked :class:`Config` from a parsed YAML mapping plus ``key=value`` overrides."""
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping with sections {SECTIONS}, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        _apply_set(raw, item)
    for key in raw:
        if key not in SECTIONS:
            raise ValueError(f"unknown config section {key!r}; expected {SECTIONS}")
    for sec in SECTIONS:
        if raw.get(sec) is None:
            raw[sec] = {}
        if not isinstance(raw[sec], dict):
            raise ValueError(f"config section {sec!r} must be a mapping, got {type(raw[sec]).__name__}")
    for sec in ("model", "data"):
        if not isinstance(raw[sec].get("name"), str):
            raise ValueError(f"{sec}.name is required (a string naming the {sec} builder)")
    known = {f.name for f in fields(TrainConfig)}
    for key in raw["train"]:
        if key not in known:
            raise ValueError(f"unknown key train.{key}; known keys: {', '.join(sorted(known))}")
    train = TrainConfig(**raw["train"])
    if isinstance(train.betas, tuple):
        train.betas = list(train.betas)
    return Config(model=raw["model"], data=raw["data"], train=train.validate())


def load(path: str, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML config file and apply ``--set`` overrides."""
    try:
        with open(path) as f:
            raw = _yaml(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist (--config)") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path!r} cannot be read ({type(e).__name__}) (--config)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ValueError(f"config file {path!r} is not valid YAML{at}: {what}") from None
    return from_dict(raw if raw is not None else {}, overrides)


def _type_name(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return "a list"


def _same_kind(value, default) -> bool:
    if value is None:
        return False
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def check_kwargs(section: str, kwargs: Dict[str, Any], allowed) -> None:
    """Reject keys of a ``model``/``data`` section that its builder does not take. When
    ``allowed`` maps keys to their defaults, a value of another kind than its default (a string
    for an integer, a number for a flag) is refused too; a default of None takes anything."""
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"unknown key {section}.{key}; known keys: {', '.join(sorted(allowed))}")
    if isinstance(allowed, dict):
        for key, value in kwargs.items():
            default = allowed[key]
            if default is not None and not _same_kind(value, default):
                raise ValueError(f"{section}.{key} must be {_type_name(default)}, got {value!r}")
