"""The GPU every Triton launch runs on: the tensors' device, not whichever one is current.

Triton launches on the *current* CUDA device. A process whose current device is cuda:0 (the
default under DDP until ``torch.cuda.set_device`` runs, model parallelism, a second model on
cuda:1) would otherwise launch the kernel for cuda:1 tensors on cuda:0: an illegal memory access
or a silent read of the wrong memory. Every launcher in this package (pwca, na2d, rollout) wraps
its launches in :func:`on_device_of`; the CUDA C++ path guards the same way in C++.

Torch only, like the other helpers of the kernel modules.
"""

from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is current (``torch.cuda.device(t.device)``).

    CPU tensors (the Triton interpreter) and a process without CUDA (tracing fake CUDA tensors,
    ahead-of-time compilation) get a no-op context: there is no device to switch to."""
    if t.device.type != "cuda" or not _cuda_available():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _cuda_available() -> bool:
    return torch.cuda.is_available()
