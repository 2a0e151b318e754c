"""Loading of the compiled extension ``dcal._C``.

Importing dcal never fails because the extension is missing: ``HAS_EXTENSION`` tells whether it
loaded, and :func:`require` raises an ImportError that says how to build it.
"""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch)

BUILD_HINT = (
    "the dcal C++/CUDA extension (dcal._C) is not built. Build it from the repository root with "
    "`pip install --no-build-isolation -e .` (or `pip install --no-build-isolation .`, also from an "
    "sdist; a C++20 compiler is needed; the CUDA part is built when torch is a CUDA build and nvcc is "
    "found, see setup.py and docs/install.md)"
)

try:
    from dcal import _C  # type: ignore[attr-defined]

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the build
    import importlib.util

    _C = None
    HAS_EXTENSION = False
    # A missing file reads "cannot import name '_C' from partially initialized module 'dcal'":
    # say what it is instead. A file that does not load (another torch) keeps its own message.
    EXTENSION_ERROR = (
        str(e)
        if importlib.util.find_spec("dcal._C") is not None
        else "no dcal._C in this install: it was built without the extension"
    )


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
    return (
        f"dcal._C not available ({EXTENSION_ERROR}): the 'cpp' backend is unavailable; triton (CUDA, or CPU "
        f"tensors under TRITON_INTERPRET=1), sdpa and reference run. To build it: a C++20 compiler and "
        f"`pip install --no-build-isolation .` from the repository or an sdist (docs/install.md)"
    )
