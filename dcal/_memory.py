"""This process's memory as the OS sees it (Linux ``/proc``): resident set, its peak and the reset
of that peak, and handing freed heap back to the OS. No dependencies, so the training loop
(:mod:`dcal.train.memory`) and the benchmark harness (:mod:`dcal.testing.measure`) share it
without importing each other."""

from __future__ import annotations

import re
from typing import Dict, Optional


def proc_status(pid="self") -> Dict[str, int]:
    """VmRSS, VmHWM, VmSize of a process in bytes (Linux; empty when unreadable)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return out
    for key in ("VmRSS", "VmHWM", "VmSize"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process to its current resident set
    (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> Optional[int]:
    """Peak resident set of this process since the last :func:`reset_peak_rss`, in bytes (the
    lifetime peak from ``getrusage`` where ``/proc`` is missing)."""
    peak = proc_status().get("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def rss() -> Optional[int]:
    """Current resident set of this process, in bytes (None where ``/proc`` is missing)."""
    return proc_status().get("VmRSS")


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so the resident set counts memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
