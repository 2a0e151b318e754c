"""Loading of the compiled extension ``dcal._C``.

Importing dcal never fails because the extension is missing: ``HAS_EXTENSION`` tells whether it
loaded, and :func:`require` raises an ImportError that says how to build it.
"""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch)

BUILD_HINT = (
    "the dcal C++/CUDA extension (dcal._C) is not built. Build it from the repository root or an "
    "sdist with `pip install --no-build-isolation .` (or `-e .`; a C++20 compiler is needed; the CUDA "
    "part is built when torch is a CUDA build and nvcc is found, see setup.py)"
)

try:
    from dcal import _C  # type: ignore[attr-defined]

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(e)


def built_with_cuda() -> bool:
    """True when the extension is loaded and its CUDA kernels are compiled in."""
    return bool(HAS_EXTENSION and _C.built_with_cuda())


def require() -> None:
    """Raise an ImportError with build instructions when the extension is missing."""
    if not HAS_EXTENSION:
        raise ImportError(f"{BUILD_HINT} (import error: {EXTENSION_ERROR})")


def status() -> str:
    """One line: whether the extension is loaded and which backends this install lacks."""
    if HAS_EXTENSION:
        cuda = "with" if built_with_cuda() else "without"
        return f"dcal._C loaded ({cuda} CUDA kernels): backends triton, cpp, sdpa, reference"
    return (f"dcal._C not built: the 'cpp' backend is unavailable, triton (CUDA, or the CPU interpreter), "
            f"sdpa and reference run ({EXTENSION_ERROR}); {BUILD_HINT}")
