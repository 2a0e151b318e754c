"""The ``"cpp"`` backend of attention_rollout: ``dcal::rollout`` from ``csrc/rollout_cpu.cpp``.

The op's schema and CPU kernel are registered by the extension (``csrc/ops.cpp``); this module
adds the fake (meta) implementation, so the op works on the meta device and under
``torch.compile``, and the backend entry point of :mod:`dcal.ops._dispatch`. Rollout has no
gradient (docs/contract.md, attention_rollout), so no autograd is registered.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from dcal import _ext

_ext.require()  # an ImportError with build instructions; the dispatch chain reports it as the skip reason


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dcal::rollout")
def _(qs, ks, lses, scale, residual):
    q = qs[0]
    return q.new_empty((q.shape[0], q.shape[2]), dtype=_out_dtype(q.dtype))


def rollout_cpp(
    qs: Sequence[Tensor], ks: Sequence[Tensor], lses: Optional[Sequence[Tensor]], scale: float, residual: float
) -> Tensor:
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`): [B, N] fp32 (fp64 for fp64).
    float16 runs the float32 kernel on float32 copies of the blocks (linear memory)."""
    with torch.no_grad():
        if qs[0].dtype == torch.float16:
            qs, ks = [q.float() for q in qs], [k.float() for k in ks]
        return torch.ops.dcal.rollout(
            list(qs), list(ks), [] if lses is None else list(lses), float(scale), float(residual)
        )
