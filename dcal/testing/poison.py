"""NaN poisoning: fresh allocations are NaN-filled while a backend runs, so an output element the
kernel never writes shows as NaN instead of passing on stale zeros.

Two ways, one implementation (the pytest fixture ``nan_empty`` and ``dcal.check`` both use it):

* :func:`poison_allocations`: patches the Python allocation functions (``torch.empty``,
  ``empty_like``, ``empty_permuted``, ``Tensor.new_empty``), which the Triton launchers and the
  sdpa backend use for their outputs;
* :func:`poison_uninitialized`: ``torch.utils.deterministic.fill_uninitialized_memory``, which
  also reaches C++ ``at::empty`` (it needs deterministic mode on: warn-only, and our kernels do
  not look at it). Not for ``sdpa``: deterministic mode could change which SDPA kernel PyTorch picks.

:func:`nan_poison` picks the way for a backend.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

PATCHED = ("empty", "empty_like", "empty_permuted")  # torch.<name>; plus torch.Tensor.new_empty


def poison_(t):
    """Fill a floating tensor (not on the meta device) with NaN in place; return it."""
    import torch

    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
        t.fill_(float("nan"))
    return t


@contextmanager
def poison_allocations():
    """While active, floating results of ``torch.empty``/``empty_like``/``empty_permuted``/
    ``Tensor.new_empty`` are NaN-filled (``empty_permuted``: outputs laid out in their input's
    dim order). Restores the originals on exit, also after an exception."""
    import torch

    real = {name: getattr(torch, name) for name in PATCHED}
    real_new_empty = torch.Tensor.new_empty

    def wrap(fn):
        return lambda *a, **k: poison_(fn(*a, **k))

    try:
        for name, fn in real.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = lambda self, *a, **k: poison_(real_new_empty(self, *a, **k))
        yield
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = real_new_empty


@contextmanager
def poison_uninitialized():
    """While active, every uninitialised allocation (also C++ ``at::empty``) is NaN-filled."""
    import torch
    import torch.utils.deterministic as det

    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            det.fill_uninitialized_memory = prev[2]


def nan_poison(backend: str):
    """The poisoning for ``backend``: allocation patching for ``sdpa`` (deterministic mode could
    change PyTorch's SDPA kernel choice), every uninitialised allocation for the others."""
    return poison_allocations() if backend == "sdpa" else poison_uninitialized()


__all__ = ["nan_poison", "poison_", "poison_allocations", "poison_uninitialized"]
