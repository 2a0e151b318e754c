"""What a bench script declares: Case, Result and the memory-floor formulas; Unavailable and the
FLOP formulas are the harness's (:mod:`dcal.testing`), re-exported here.

Nothing here measures; :mod:`bench.runner` does, :mod:`bench.tables` and :mod:`bench.plots` show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from dcal.testing.flops import flops_attention, flops_neighborhood, flops_rollout
from dcal.testing.measure import Unavailable

__all__ = [
    "MIB",
    "Case",
    "Result",
    "Unavailable",
    "floor_outputs",
    "flops_attention",
    "flops_neighborhood",
    "flops_rollout",
    "nbytes",
]

MIB = 1024 * 1024

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Case:
    """One measured point of a bench.

    name: short unique id ("N785-fwd+bwd"); params: shape and options, JSON-serialisable, read by
    the bench's ``make_inputs`` and providers; dtype: "float32", ...; device: "cpu" or "cuda";
    mode: "fwd" or "fwd+bwd" (informational); flops: floating-point operations of one call (for
    GFLOP/s; 0 if not meaningful; a bench may count per provider with ``flops_for``); x: the value
    plotted on the x axis; group: cases of one group share a plot panel.
    floor_bytes: the op's memory floor for one call beyond its inputs (outputs, plus gradients for
    fwd+bwd), printed beside the measured peak; heavy: one call takes tens of seconds, so the
    default run measures one call per provider (time and memory from the same call) instead of
    interleaved rounds; baseline: the provider ratios are taken against in this case (empty:
    the bench's ``BASELINE``).
    """

    name: str
    params: Dict[str, Any]
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "fwd"
    flops: float = 0.0
    x: float = 0.0
    group: str = ""
    floor_bytes: float = 0.0
    heavy: bool = False
    baseline: str = ""

    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class Result:
    """One (case, provider) outcome. Times in ms, memory in bytes; None when not measured.

    reps: timed calls behind the median; note: how they were taken when it is not the usual
    interleaved rounds (e.g. "1 call (heavy)"); flops: the FLOPs of one call of this provider
    (the case's unless the bench counts per provider); peak_gflops: the machine's matmul speed
    measured in the same run, for :attr:`share`, and peak_text: which GEMM gave it and what else
    was measured (FMA peak, clock); load1: the 1-minute load average when the case ran.
    """

    case: Case
    provider: str
    status: str = "ok"  # "ok", "OOM", "skipped: ...", "error: ..."
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    peak_bytes: Optional[int] = None
    times_ms: Optional[List[float]] = None  # one per round, in the order of the rounds
    reps: int = 0
    note: str = ""
    flops: Optional[float] = None
    peak_gflops: Optional[float] = None
    load1: Optional[float] = None
    peak_text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def call_flops(self) -> float:
        return self.case.flops if self.flops is None else self.flops

    @property
    def tflops(self) -> Optional[float]:
        if self.median_ms is None or not self.call_flops:
            return None
        return self.call_flops / (self.median_ms * 1e-3) / 1e12

    @property
    def gflops(self) -> Optional[float]:
        t = self.tflops
        return None if t is None else t * 1e3

    @property
    def share(self) -> Optional[float]:
        """Achieved GFLOP/s as a fraction of the machine's measured matmul peak."""
        g = self.gflops
        return None if g is None or not self.peak_gflops else g / self.peak_gflops


# ----------------------------------------------------------------------------- memory floors


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor of this shape and dtype name ("float32", ...)."""
    return int(math.prod(shape)) * _ITEMSIZE[dtype]


def floor_outputs(out_shape: Sequence[int], dtype: str, mode: str, grad_shapes: Sequence[Sequence[int]] = ()) -> int:
    """Memory floor of one call: its output, plus one gradient per differentiable input for fwd+bwd."""
    total = nbytes(out_shape, dtype)
    if mode != "fwd":
        total += sum(nbytes(s, dtype) for s in grad_shapes)
    return total
