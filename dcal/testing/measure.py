"""Measuring one call: ``Unavailable``, timing and peak memory (``bench/`` and ``dcal.check.bench``).

* :class:`Unavailable`: raised by a provider's set-up when it cannot run here (a skip with a
  reason, not an error);
* :func:`time_ms`: one call bracketed by ``torch.cuda.synchronize`` on CUDA, ``perf_counter``;
* :func:`time_events_ms`: one call timed by CUDA events on the current stream (no device-wide
  synchronisation before the call), ``perf_counter`` on CPU;
* :func:`cuda_peak`: peak ``max_memory_allocated`` of one call beyond what is live before it;
* :func:`cpu_peak`: peak resident set of one call beyond the resident set before it (Linux:
  ``/proc/self/clear_refs`` resets ``VmHWM``; freed heap memory is returned to the OS first);
* :func:`is_oom`: whether an exception is an out-of-memory error (CPU or CUDA).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Tuple

from dcal._memory import proc_status, release_free_heap, reset_peak_rss


class Unavailable(Exception):
    """Raised by a provider's set-up when it cannot run here (reported as ``skipped: <why>``)."""


def sync(device) -> None:
    """``torch.cuda.synchronize()`` when ``device`` is a CUDA device (or True), else nothing."""
    if device is True or (isinstance(device, str) and device.startswith("cuda")):
        import torch

        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], cuda: bool) -> float:
    """One call of ``fn``, in ms (bracketed by synchronisation on CUDA)."""
    sync(cuda)
    t0 = time.perf_counter()
    fn()
    sync(cuda)
    return (time.perf_counter() - t0) * 1e3


def time_events_ms(fn: Callable[[], Any], device: str) -> float:
    """One call of ``fn`` in ms: CUDA events recorded around it on the current stream, then
    ``end.synchronize()``; ``perf_counter`` on CPU. The result is dropped before returning."""
    if device == "cuda":
        import torch

        stream = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        out = fn()
        end.record(stream)
        end.synchronize()
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1e3
    del out
    return ms


def cuda_peak(fn: Callable[[], Any]) -> Tuple[int, float]:
    """(peak bytes beyond what is allocated before the call, the call's ms) of one CUDA call."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(fn, True)
    return int(torch.cuda.max_memory_allocated() - base), ms


def release_freed_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS, so the resident set holds live
    data only."""
    gc.collect()
    release_free_heap()


def cpu_peak(fn: Callable[[], Any]) -> Tuple[int, float]:
    """(peak resident bytes beyond the resident set before the call, the call's ms)."""
    release_freed_memory()
    base = proc_status()["VmRSS"]
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs not writable)")
    ms = time_ms(fn, False)
    return max(0, proc_status()["VmHWM"] - base), ms


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error: Python's, torch's (CUDA or CPU), or the allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and (
        "not enough memory" in msg or "can't allocate memory" in msg or "out of memory" in msg.lower()
    )


__all__ = [
    "Unavailable",
    "cpu_peak",
    "cuda_peak",
    "is_oom",
    "proc_status",
    "release_freed_memory",
    "reset_peak_rss",
    "sync",
    "time_events_ms",
    "time_ms",
]
