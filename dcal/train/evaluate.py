"""``python -m dcal.train --config C --eval-only --checkpoint P [--out DIR]``: top-1 / top-5
accuracy of a checkpoint on the config's validation set, and the accuracy of each class in a CSV
(``DIR/per_class_accuracy.csv``, or next to the checkpoint as ``<name>.per_class.csv``). The run
folder's metrics, checkpoints and config are not touched.

For dense predictions (``[B, C, X, Y]``, the BEV model) every cell counts as a sample. Tasks with
their own metric (zero-shot accuracy of a contrastive model, episode accuracy) report that metric
as top-1; top-5 and per-class accuracy are then not defined and not reported.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, Optional

import torch

from dcal.train.rundir import compare_configs


def read_weights(path: str) -> Dict[str, Any]:
    """(model state dict, the config it was trained with or None) from a training checkpoint or a
    bare state dict; one-line ValueError otherwise."""
    from dcal.train.checkpoint import UnreadableCheckpoint, load

    try:
        state = load(path)
        return {"model": state["model"], "config": state.get("config"), "step": state.get("step")}
    except UnreadableCheckpoint as e:
        if "is not a training checkpoint" not in str(e):
            raise ValueError(f"--checkpoint: {e}") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj, "config": None, "step": None}
    raise ValueError(f"--checkpoint {path} is neither a dcal.train checkpoint nor a state dict of tensors")


def evaluate_checkpoint(cfg, checkpoint: str, out: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation set of ``cfg``; returns the figures and writes the
    per-class CSV. Raises ValueError (one line) before any work when the checkpoint does not fit."""
    from dcal.train.build import build_task

    w = read_weights(checkpoint)
    if w["config"]:
        refused, _ = compare_configs({"model": w["config"].get("model", {})}, {"model": cfg.model})
        refused = [r for r in refused if r.startswith("model.")]
        if refused:
            raise ValueError(
                f"--checkpoint {checkpoint} holds another model than the config builds: {'; '.join(refused)}"
            )
    task = build_task(cfg, seed=cfg.train.seed, weights_from_checkpoint=True)
    if task.val_set is None:
        raise ValueError(f"data.name {cfg.data['name']!r} has no validation set to evaluate on")
    torch.manual_seed(cfg.train.seed)
    model = task.model_factory()
    own = model.state_dict()
    for k, v in w["model"].items():
        if k not in own:
            raise ValueError(f"--checkpoint {checkpoint}: key {k!r} is not in the model the config builds")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"--checkpoint {checkpoint}: key {k!r} has shape {list(v.shape)}, the config's model "
                f"has {list(own[k].shape)}"
            )
    missing = sorted(set(own) - set(w["model"]))
    if missing:
        raise ValueError(f"--checkpoint {checkpoint}: the model's {missing[0]!r} is missing")
    model.load_state_dict(w["model"])

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    amp = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[t.amp]
    model.to(device).eval()
    from torch.utils.data import DataLoader

    from dcal.train.data import collate
    from dcal.train.trainer import _to

    bs = t.micro_batch if isinstance(t.micro_batch, int) else t.effective_batch
    coupled = task.eval_fn is not None
    if coupled:
        bs = t.effective_batch
    n = len(task.val_set)
    loader = DataLoader(
        task.val_set,
        batch_sampler=[list(range(i, min(i + bs, n))) for i in range(0, n, bs)],
        collate_fn=collate,
        num_workers=t.num_workers,
    )
    correct1 = correct5 = count = 0.0
    per_class_n = per_class_ok = None
    k5 = None
    with torch.no_grad():
        for x, y in loader:
            x, y = _to(x, device), _to(y, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if coupled:
                    s, c = task.eval_fn(model, x, y)
                    correct1, count = correct1 + float(s), count + float(c)
                    continue
                scores = model(x)
            if isinstance(scores, dict):
                scores = next(iter(scores.values()))
            scores = scores.float()
            if scores.dim() > 2:  # dense: [B, C, ...] -> [cells, C]
                scores = scores.movedim(1, -1).reshape(-1, scores.shape[1])
            y = y.reshape(-1)
            C = scores.shape[1]
            k5 = min(5, C)
            top = scores.topk(k5, dim=1).indices
            hit1 = top[:, 0] == y
            hit5 = (top == y[:, None]).any(1)
            correct1 += float(hit1.sum())
            correct5 += float(hit5.sum())
            count += y.numel()
            if per_class_n is None:
                per_class_n = torch.zeros(C, dtype=torch.float64)
                per_class_ok = torch.zeros(C, dtype=torch.float64)
            per_class_n += torch.bincount(y.cpu(), minlength=C).double()
            per_class_ok += torch.bincount(y[hit1].cpu(), minlength=C).double()
    result = {
        "checkpoint": checkpoint,
        "samples": int(count),
        "top1": correct1 / count if count else None,
        "top5": None,
        "k": None,
        "csv": None,
    }
    if not coupled and count:
        result["top5"], result["k"] = correct5 / count, k5
        if out:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, "per_class_accuracy.csv")
        else:
            path = os.path.splitext(checkpoint)[0] + ".per_class.csv"
        names = getattr(task.val_set, "classes", None)
        with open(path, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["class", "name", "samples", "correct", "accuracy"])
            for c in range(per_class_n.numel()):
                nc, ok = int(per_class_n[c]), int(per_class_ok[c])
                name = names[c] if names is not None and c < len(names) else str(c)
                wr.writerow([c, name, nc, ok, f"{ok / nc:.6f}" if nc else ""])
        result["csv"] = path
    what = f"top-1 {result['top1']:.3f}"
    if result["top5"] is not None:
        what += f", top-{result['k']} {result['top5']:.3f}"
    tail = (
        f"; per-class accuracy in {result['csv']}"
        if result["csv"]
        else " (the task's own metric; top-5 and per-class accuracy are not defined for it)"
        if coupled
        else ""
    )
    log(
        f"eval: {what} on {result['samples']} validation {'cells' if k5 and count > n else 'samples'} of "
        f"data.name {cfg.data['name']!r}{tail}"
    )
    return result
