"""The judging rule of every backend-against-reference comparison (tests, ``dcal.check``).

FlashAttention's rule: with ``T`` the truth (the reference backend in fp64, or fp32 for whole
models under autocast) and ``P`` the reference backend run in the backend's own low precision on
the same rounded inputs (PyTorch's own error at that precision),

    max|backend - T| <= factor * max|P - T| + atol + rtol * max|T|

``factor`` is :data:`FWD_FACTOR` for forward values (outputs, logsumexps) and :data:`GRAD_FACTOR`
for gradients; ``atol + rtol * max|T|`` is the *floor*, a :class:`Floor` looked up per dtype in a
floor table. In fp64 ``P`` is ``T`` itself, so the bound is the floor alone.

Floor tables (one row per dtype; a new dtype or floor is one entry here):

* :data:`FLOORS`: the default: kernels against the fp64 truth (``dcal.check``, the kernel
  tests), and modules and models under low-precision autocast against an fp32 truth;
* :data:`TIGHT_FLOORS`: comparisons that need almost no slack: the rollout (fp32 arithmetic on
  low-precision inputs, so the reference's error is the inputs' rounding alone) and the sdpa
  backend (PyTorch's own kernels on both sides).

Nothing here imports torch at module import time (``dcal.check`` plans runs without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

FWD_FACTOR = 2.0  # forward values: at most 2x the reference's own low-precision error
GRAD_FACTOR = 3.0  # gradients: at most 3x


@dataclass(frozen=True)
class Floor:
    """The additive slack of the rule: ``atol + rtol * max|truth|``."""

    atol: float
    rtol: float = 0.0

    def __call__(self, truth_max: float) -> float:
        return self.atol + self.rtol * truth_max


# Kernels against the fp64 truth.
FP64_FLOOR = Floor(1e-9, 1e-9)
FP32_FLOOR = Floor(1e-5, 1e-5)
FP16_FLOOR = Floor(1e-5, 1e-4)
# bf16: rtol 7e-4 (not 1e-3) keeps every test at or below the floors it used before the rule had
# one home (the tightest: 8e-3 absolute for the Triton neighborhood gradients, up to |drpb| ~ 10.6).
BF16_FLOOR = Floor(1e-4, 7e-4)
FLOORS: Dict[str, Floor] = {
    "float64": FP64_FLOOR,
    "float32": FP32_FLOOR,
    "float16": FP16_FLOOR,
    "bfloat16": BF16_FLOOR,
}

# Almost no slack (see the module's docstring).
TIGHT_FLOOR = Floor(1e-7)
TIGHT_FLOORS: Dict[str, Floor] = {"float32": TIGHT_FLOOR, "float16": TIGHT_FLOOR, "bfloat16": TIGHT_FLOOR}


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32`` or ``"float32"``."""
    return str(dtype).replace("torch.", "")


def is_grad(name: str) -> bool:
    """Gradients are named ``d<input>`` (``dq``, ``dk1``, ``drpb``); everything else is forward."""
    return name.startswith("d")


def floor_of(dtype: Any, floors: Mapping[str, Floor] = FLOORS) -> Floor:
    name = dtype_name(dtype)
    try:
        return floors[name]
    except KeyError:
        raise ValueError(
            f"dtype {name!r} has no floor in this table; known: {', '.join(floors)} (add a row in dcal/testing/judging.py)"
        ) from None


def tolerance(
    dtype: Any, ref_err: float, truth_max: float, *, grad: bool = False, floors: Mapping[str, Floor] = FLOORS
) -> float:
    """The largest error the rule allows: ``factor * ref_err + floor(truth_max)``.

    dtype: the dtype the backend ran in (``torch.bfloat16`` or ``"bfloat16"``); ref_err:
    max|reference in that dtype - truth| (0 in fp64); truth_max: max|truth|; grad: a gradient
    (factor :data:`GRAD_FACTOR`) or a forward value (:data:`FWD_FACTOR`); floors: the table.
    """
    if ref_err < 0 or truth_max < 0:
        raise ValueError(f"ref_err and truth_max are maxima of absolute values, got {ref_err} and {truth_max}")
    factor = GRAD_FACTOR if grad else FWD_FACTOR
    return factor * ref_err + floor_of(dtype, floors)(truth_max)


def max_abs_err(got, want) -> float:
    """max|got - want| in fp64 (0 for empty tensors; inf when either side has a NaN)."""
    import torch

    if got.numel() == 0:
        return 0.0
    d = (got.detach().to(torch.float64).cpu() - want.detach().to(torch.float64).cpu()).abs()
    return float(d.nan_to_num(float("inf")).max().item())


def max_abs(t) -> float:
    import torch

    return float(t.detach().to(torch.float64).abs().max().item()) if t.numel() else 0.0


@dataclass
class Verdict:
    """One judged value: its error, the reference's own error, max|truth| and the bound."""

    name: str
    dtype: str
    err: float
    ref_err: float
    truth_max: float
    tol: float
    worst: str = ""

    @property
    def ok(self) -> bool:
        return self.err <= self.tol

    def message(self) -> str:
        factor = GRAD_FACTOR if is_grad(self.name) else FWD_FACTOR
        return (
            f"{self.name} ({self.dtype}): max error {self.err:.3e} > bound {self.tol:.3e} = {factor:g} x reference "
            f"{self.dtype} error {self.ref_err:.3e} + floor at max|truth| {self.truth_max:.3g}" + self.worst
        )


def _worst(got, want) -> str:
    import torch

    d = (got.detach().to(torch.float64).cpu() - want.detach().to(torch.float64).cpu()).abs().nan_to_num(float("inf"))
    if d.numel() == 0:
        return ""
    i = int(d.argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape))
    g, w = got.detach().reshape(-1)[i].item(), want.detach().reshape(-1)[i].item()
    return f"; worst at {list(idx)}: got {g:.6g}, truth {w:.6g}"


def judge(
    name: str,
    got,
    truth,
    low=None,
    *,
    dtype: Any = None,
    grad: Optional[bool] = None,
    floors: Mapping[str, Floor] = FLOORS,
) -> Verdict:
    """Judge ``got`` against ``truth`` by the rule. ``low``: the reference run in ``got``'s
    dtype (None: no reference error, i.e. fp64 or a floor-only comparison); ``dtype``: the
    backend's dtype when ``got`` is not in it (e.g. an fp32 lse of a bf16 run); ``grad``: None
    means by name (:func:`is_grad`)."""
    if tuple(got.shape) != tuple(truth.shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
    dt = dtype_name(got.dtype if dtype is None else dtype)
    err = max_abs_err(got, truth)
    ref_err = 0.0 if low is None else max_abs_err(low, truth)
    tmax = max_abs(truth)
    g = is_grad(name) if grad is None else grad
    tol = tolerance(dt, ref_err, tmax, grad=g, floors=floors)
    v = Verdict(name, dt, err, ref_err, tmax, tol)
    if not v.ok:
        v.worst = _worst(got, truth)
    return v


def assert_close_to_reference(name: str, got, truth, low=None, **kw) -> Verdict:
    """:func:`judge`, raising an ``AssertionError`` that states the error, the bound and the
    worst element when the rule is not met. Non-finite values always fail."""
    import torch

    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{name}: non-finite values (an unwritten output?)")
    v = judge(name, got, truth, low, **kw)
    if not v.ok:
        raise AssertionError(v.message())
    return v


__all__ = [
    "BF16_FLOOR",
    "FLOORS",
    "FP16_FLOOR",
    "FP32_FLOOR",
    "FP64_FLOOR",
    "FWD_FACTOR",
    "Floor",
    "GRAD_FACTOR",
    "TIGHT_FLOOR",
    "TIGHT_FLOORS",
    "Verdict",
    "assert_close_to_reference",
    "dtype_name",
    "floor_of",
    "is_grad",
    "judge",
    "max_abs",
    "max_abs_err",
    "tolerance",
]
