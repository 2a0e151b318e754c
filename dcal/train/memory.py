"""Memory measurement of this process: peak resident set (reset and read) on CPU, heap release.

The training loop reads the step's peak with :func:`cpu_peak_rss` after :func:`reset_cpu_peak`;
:mod:`dcal.train.autobatch` measures real CPU steps with the same functions.
"""

from __future__ import annotations

from typing import Optional


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss() -> Optional[int]:
    """Peak resident set of this process since the last :func:`reset_cpu_peak`, in bytes."""
    peak = _proc_status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def cpu_rss() -> Optional[int]:
    """Current resident set of this process, in bytes (None where /proc is missing)."""
    return _proc_status("VmRSS")


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS counts memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
