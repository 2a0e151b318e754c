"""Where the outputs of an op go in memory: in the dim order of the input they belong to.

Neighborhood attention writes ``out`` and ``dq`` in the order of q's strides, ``dk`` in k's and
``dv`` in v's, so a caller whose q, k, v are views of one layout (heads-last ``[B, X, Y, H, D]``,
channels-first ``[B, C, X, Y]``, slices of a fused qkv projection) gets outputs that reshape back
to that layout without a copy.

The rule (:func:`empty_in_order_of`; ``dcal::empty_in_order_of`` in ``csrc/na2d_host.cpp`` is the
same rule in C++, so the fake implementations give the real strides exactly): a dense tensor whose
dims are laid out outermost-first by decreasing stride of ``t``, ties kept in logical dim order; a
broadcast dim (stride 0) counts as outermost. For a dense ``t`` this is ``t``'s own layout (up to
the strides of size-1 dims); for a non-dense one (a slice of a qkv projection) it is the dense
layout with the same dim order, which ``torch.empty_like`` also gives but with other strides for
size-1 dims in its fake and real implementations.

Torch only: imported by the kernels, the C++ ops' fake implementations and the reference backend.
"""

from __future__ import annotations

from typing import List

import torch


def dim_order(t: torch.Tensor) -> List[int]:
    """t's dims, outermost first: decreasing stride, ties in logical order, stride 0 first."""
    s = t.stride()
    # sorted() is stable, so equal keys keep logical order
    return sorted(range(t.dim()), key=lambda d: (s[d] != 0, -s[d]))


def empty_in_order_of(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised dense tensor of t's shape, device and (by default) dtype, its dims laid
    out in the order of t's strides (:func:`dim_order`)."""
    return torch.empty_permuted(t.shape, dim_order(t), dtype=t.dtype if dtype is None else dtype, device=t.device)
