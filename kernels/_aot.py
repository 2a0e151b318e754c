"""What a kernel module declares about its launchable configurations, for ahead-of-time proofs.

Each kernel module exposes ``aot_specs()`` returning :class:`KernelSpec`s: plain data (the JIT
function, its argument types, constexpr values, warps, stages, a label). The compile harness in
``dcal.testing.aot`` reads them; this module depends on nothing, so kernel files need only torch
and triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class KernelSpec:
    """One launchable configuration of a ``@triton.jit`` kernel.

    name: readable kernel name ("pwca_fwd"); kernel: the JIT function; signature: argument name ->
    Triton type ("*fp16", "i32", "fp32", "constexpr"), in the kernel's argument order; constexprs:
    values of the constexpr arguments; label: what a report prints as the configuration.
    aligned: pointer arguments specialised as 16-byte aligned, as the runtime launcher does for
    aligned pointers (None: every pointer argument).
    """

    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    label: Dict[str, object] = field(default_factory=dict)
    aligned: Optional[List[str]] = None
