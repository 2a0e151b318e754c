"""One run per ``--out`` folder.

A folder holding the metrics or checkpoints of a run is taken by a new run only with
``--resume`` (continue it) or ``--overwrite`` (move it aside to ``OUT.old-<UTC time>``, never
delete it). On ``--resume`` the saved config is compared with the current one: a change of a key
that changes the model or the data (every ``model.*`` and ``data.*`` key but a few that do not
change the math, and ``train.effective_batch``) is refused naming each key and both values; the
other changes (epochs, lr, ...) are listed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

# model/data keys whose change does not change what is trained: the pretrained start (a resumed
# run takes its weights from the checkpoint), the kernel backend, data loading
FREE_KEYS = {"model.pretrained", "model.backend", "model.grad_checkpointing", "data.root"}
# train keys that change the data a step sees or the model's state: refused like model/data keys
FIXED_TRAIN_KEYS = {"train.effective_batch"}


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def run_contents(out: str) -> List[str]:
    """What in ``out`` belongs to a run (empty: the folder can take a new run)."""
    from dcal.train.checkpoint import CheckpointDir

    if not os.path.isdir(out):
        return []
    found = []
    for name in ("metrics.jsonl", "steps.jsonl"):
        p = os.path.join(out, name)
        if os.path.isfile(p):
            n = _count_lines(p)
            found.append(f"{name} ({n} row{'s' if n != 1 else ''})")
    ck = CheckpointDir(out)
    steps = ck.list()
    if steps:
        found.append(f"{len(steps)} checkpoint{'s' if len(steps) != 1 else ''} (last {os.path.basename(steps[-1])})")
    if os.path.isfile(ck.best_path):
        found.append("checkpoints/best.pt")
    return found


def check_new_run(out: str, overwrite: bool) -> Optional[str]:
    """For a run without ``--resume``: None when ``out`` is free, the folder to move it to when
    ``overwrite``; a one-line ValueError when it holds another run."""
    found = run_contents(out)
    if not found:
        return None
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume, "
            f"choose a new --out, or pass --overwrite to move it aside to {out}.old-<time>"
        )
    return aside_name(out)


def check_resume_target(out: str, path: str) -> None:
    """``--resume PATH`` from outside ``out`` may start ``out`` afresh, not continue into a folder
    holding another run (the metrics of both would mix)."""
    from dcal.train.checkpoint import CheckpointDir

    inside = os.path.dirname(os.path.abspath(path)) == os.path.abspath(CheckpointDir(out).dir)
    found = run_contents(out)
    if found and not inside and os.path.isfile(path):  # a missing path is reported by the loader
        raise ValueError(
            f"--resume {path} is not a checkpoint of the run in --out {out} ({', '.join(found)}); "
            f"resume into a new --out, or give one of {CheckpointDir(out).dir}'s checkpoints"
        )


def aside_name(out: str) -> str:
    base = f"{os.path.normpath(out)}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    name, i = base, 1
    while os.path.exists(name):
        name, i = f"{base}-{i}", i + 1
    return name


def move_aside(out: str, to: str) -> None:
    """Rename the old run folder (nothing is deleted)."""
    os.rename(out, to)


def _flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    flat = {}
    for sec in ("model", "data", "train"):
        for k, v in (cfg.get(sec) or {}).items():
            flat[f"{sec}.{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def _train_defaults() -> Dict[str, Any]:
    from dataclasses import asdict

    from dcal.train.config import TrainConfig

    return {f"train.{k}": v for k, v in asdict(TrainConfig()).items()}


def _model_defaults(model: Dict[str, Any]) -> Dict[str, Any]:
    """The defaults of the model builder's keys, where the builder declares them (its
    ``MODEL_BUILDERS`` entry; a key left out of one config and set to its default in the other is
    no change)."""
    from dcal.train.build import MODEL_BUILDERS

    entry = MODEL_BUILDERS.get((model or {}).get("name"))
    if entry is None or entry.keys is None:
        return {}
    return {f"model.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in entry.keys().items()}


def compare_configs(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(refused, changed): ``key: saved -> current`` for each key that differs; refused are those
    that change the model or the data."""
    a, b = _flat(saved), _flat(current)
    defaults = _train_defaults()
    if (saved.get("model") or {}).get("name") == (current.get("model") or {}).get("name"):
        defaults.update(_model_defaults(current.get("model")))
    refused, changed = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, defaults.get(key, "(unset)")), b.get(key, defaults.get(key, "(unset)"))
        if va == vb:
            continue
        line = f"{key}: {_show(va)} -> {_show(vb)}"
        sec = key.split(".", 1)[0]
        if key in FIXED_TRAIN_KEYS or (sec in ("model", "data") and key not in FREE_KEYS):
            refused.append(line)
        else:
            changed.append(line)
    return refused, changed


def _show(v) -> str:
    return v if isinstance(v, str) and v == "(unset)" else json.dumps(v)


def check_resume(saved_cfg: Optional[Dict[str, Any]], current: Dict[str, Any], path: str) -> List[str]:
    """The changed keys (to be listed); ValueError (one line) when one changes the model or data."""
    if not saved_cfg:
        return []
    refused, changed = compare_configs(saved_cfg, current)
    if refused:
        raise ValueError(
            f"--resume: {path} was trained with another model or data; "
            f"{'; '.join(refused)} (resume with the saved values, or start a new run with a new --out)"
        )
    return changed


def finished(state: Dict[str, Any], train_cfg) -> bool:
    """Whether the checkpoint's run has nothing left to do under ``train_cfg``."""
    if state.get("epoch", 0) >= train_cfg.epochs:
        return True
    return bool(train_cfg.max_steps) and state.get("step", 0) >= train_cfg.max_steps


def finished_message(out: str, state: Dict[str, Any], train_cfg) -> str:
    best = state.get("best_metric")
    best = f", best val_acc {best:.3f}" if isinstance(best, float) else ""
    how = "raise train.epochs" if state.get("epoch", 0) >= train_cfg.epochs else "raise train.max_steps"
    return (
        f"the run in {out} is finished (epoch {min(state.get('epoch', 0), train_cfg.epochs)} of "
        f"{train_cfg.epochs}, step {state.get('step', 0)}{best}); nothing to do: {how} to train on"
    )
