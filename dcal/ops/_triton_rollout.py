"""The ``"triton"`` backend of attention_rollout: ``dcal::rollout_triton``, a ``triton_op`` over
the kernels of ``kernels/rollout.py``.

``triton_op`` + ``wrap_triton`` keep the kernels visible to ``torch.compile``. The fake
implementation is registered explicitly instead of triton_op's default (the launcher run on fake
tensors): under TRITON_INTERPRET=1 the launcher would run the kernels on fake tensors' storage.
Rollout has no gradient (docs/contract.md, attention_rollout), so no autograd is registered.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from dcal.kernels.rollout import rollout_fwd


@triton_op("dcal::rollout_triton", mutates_args=())
def rollout_triton_op(qs: List[Tensor], ks: List[Tensor], lses: List[Tensor], scale: float, residual: float) -> Tensor:
    """Row 0 of ``S_L @ ... @ S_1``, [B, N] fp32; ``lses`` empty means recompute."""
    return rollout_fwd(qs, ks, lses if len(lses) else None, scale, residual, wrap=wrap_triton)


@rollout_triton_op.register_fake
def _(qs, ks, lses, scale, residual):
    q = qs[0]
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


def rollout_triton(
    qs: Sequence[Tensor], ks: Sequence[Tensor], lses: Optional[Sequence[Tensor]], scale: float, residual: float
) -> Tensor:
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`)."""
    with torch.no_grad():
        return rollout_triton_op(list(qs), list(ks), [] if lses is None else list(lses), float(scale), float(residual))
