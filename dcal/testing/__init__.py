"""The backend-against-reference harness shared by ``tests/``, ``dcal.check`` and ``bench/``.

* :mod:`dcal.testing.inputs`: the case type and input builders of the three op families in every
  layout (heads-first, heads-last, packed strided views, non-contiguous);
* :mod:`dcal.testing.judging`: the judging rule (one function, floors per dtype);
* :mod:`dcal.testing.poison`: NaN poisoning of fresh allocations;
* :mod:`dcal.testing.measure`: ``Unavailable``, timing and peak memory of one call;
* :mod:`dcal.testing.flops`: the benchmarks' FLOP formulas;
* :mod:`dcal.testing.providers`: the peer implementations the benchmarks compare against.

(:mod:`dcal.testing.aot`, the ahead-of-time Triton compiler, is separate.) Nothing here imports
torch until it is used.
"""

from dcal.testing.flops import flops_attention, flops_matmul, flops_neighborhood, flops_rollout, flops_vit_step
from dcal.testing.inputs import (
    FAMILY,
    LAYOUTS,
    Case,
    attention_inputs,
    case,
    layout_of,
    neighborhood_inputs,
    rollout_inputs,
)
from dcal.testing.measure import Unavailable, cpu_peak, cuda_peak, time_events_ms, time_ms
from dcal.testing.poison import nan_poison, poison_allocations, poison_uninitialized
from dcal.testing.judging import (
    FLOORS,
    FWD_FACTOR,
    GRAD_FACTOR,
    TIGHT_FLOORS,
    Floor,
    assert_close_to_reference,
    judge,
    tolerance,
)

__all__ = [
    "FAMILY",
    "FLOORS",
    "FWD_FACTOR",
    "Floor",
    "GRAD_FACTOR",
    "LAYOUTS",
    "TIGHT_FLOORS",
    "Case",
    "Unavailable",
    "assert_close_to_reference",
    "attention_inputs",
    "case",
    "cpu_peak",
    "cuda_peak",
    "flops_attention",
    "flops_matmul",
    "flops_neighborhood",
    "flops_rollout",
    "flops_vit_step",
    "judge",
    "layout_of",
    "nan_poison",
    "neighborhood_inputs",
    "poison_allocations",
    "poison_uninitialized",
    "rollout_inputs",
    "time_events_ms",
    "time_ms",
    "tolerance",
]
