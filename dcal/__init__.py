"""dcal: fused, exact attention kernels for DCAL and local 2-D neighborhood attention.

Public entry points: :mod:`dcal.ops` (functional ops), :mod:`dcal.nn` (drop-in modules),
:mod:`dcal.models` (DCAL ViT, BEV graph module) and :mod:`dcal.train` (training loop).
"""

from dcal import _ext  # noqa: F401  (loads dcal._C when built, so its ops are registered)
from dcal import ops  # noqa: F401

__version__ = "0.1.0"
