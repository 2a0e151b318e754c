"""Optimiser pieces of the training loop: AdamW parameter groups and the cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (biases, norms, learnable loss weights), on the
    names listed by ``model.no_weight_decay()`` (timm convention: position/CLS embeddings) and on
    anything named ``loss_weights``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if p.ndim <= 1 or prefixes & skip or "loss_weights" in parts:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CosineWarmup:
    """lr(step): linear warmup over ``warmup`` steps to ``peak``, then cosine down to ``floor``
    at ``total`` steps. Its state is the step counter (advanced also on skipped steps, so the
    schedule's length does not depend on how many fp16 steps overflow)."""

    def __init__(self, peak: float, floor: float, warmup: int, total: int):
        self.peak, self.floor, self.warmup, self.total = peak, min(floor, peak), warmup, max(total, 1)
        self.step_count = 0

    def lr(self, step: Optional[int] = None) -> float:
        s = self.step_count if step is None else step
        if s < self.warmup:
            return self.peak * (s + 1) / self.warmup
        t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.peak - self.floor) * (1 + math.cos(math.pi * t))

    def state_dict(self) -> Dict[str, Any]:
        return {
            "step_count": self.step_count,
            "peak": self.peak,
            "floor": self.floor,
            "warmup": self.warmup,
            "total": self.total,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
