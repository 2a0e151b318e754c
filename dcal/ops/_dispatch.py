"""Backend choice: an ordered chain of ``can_run`` checks, each returning why it cannot run.

Every (op, backend) pair names a lazily imported implementation. ``backend=None`` takes the first
backend in the op's chain whose check passes; the ``DCAL_BACKEND`` environment variable moves a
backend to the front of every chain (ops it cannot run fall through to the rest of the chain);
an explicit ``backend=`` that cannot run raises a ValueError with the reason.

Implementation contracts (all differentiable unless noted):
  multi_kv_attention:        fn(q, k1, v1, k2, v2, scale) -> (out, lse); k2, v2 may be None
  neighborhood_attention2d:  fn(q, k, v, rpb, kernel_size, border, scale, dilation) -> out; rpb may be None
  attention_rollout:         fn(qs, ks, lses, scale, residual) -> [B, N] fp32 (no grad); lses may be None
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dcal import _ext
from dcal.kernels._common import TRITON_DTYPES

BACKENDS = ("triton", "cpp", "sdpa", "reference")


@dataclass
class Call:
    """What a backend check may look at: the op, the tensors' device and dtype, and op attributes."""

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    explicit: bool = False  # the backend was named by the caller (not chosen by the chain)
    attrs: Dict[str, object] = field(default_factory=dict)


@dataclass
class Impl:
    op: str
    backend: str
    target: str  # "module:function", imported on first use
    check: Callable[[Call], Optional[str]]
    # Lazy implementations (the Triton ones) are imported by ``loader``, a function holding a
    # literal import statement: torch.compile executes an import statement it meets while tracing
    # (and cannot trace importlib.import_module), so the first call may come from a compiled
    # function. Eager ones are imported by preload() at `import dcal.ops`.
    loader: Optional[Callable[[], Callable]] = None

    _loaded: Optional[Tuple[Optional[Callable], Optional[str]]] = None

    def load(self) -> Tuple[Optional[Callable], Optional[str]]:
        if self.loader is not None and torch.compiler.is_compiling():
            # Traced: import without touching the cache, so the compiled graph guards on nothing
            # that the first eager call changes (no recompile after it).
            return self._import()
        if self._loaded is None:
            self._loaded = self._import()
        return self._loaded

    def _import(self) -> Tuple[Optional[Callable], Optional[str]]:
        try:
            if self.loader is not None:
                return self.loader(), None
            mod_name, fn_name = self.target.split(":")
            return getattr(importlib.import_module(mod_name), fn_name), None
        except (ImportError, AttributeError) as e:
            return None, f"implementation {self.target} unavailable ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------- checks

_TRITON_DTYPES = tuple(TRITON_DTYPES)
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# The C++ CPU kernels also take float16, computing in float32 (copies of the inputs, linear memory).
_CPP_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_type(call: Call) -> str:
    """The device a call runs on; a meta-device call (shape/memory prediction through the fake
    implementations) is routed as the run it predicts: CUDA when present, else CPU."""
    if call.device.type == "meta":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return call.device.type


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fused_head_dim(call: Call) -> Optional[str]:
    d = call.head_dim
    if not (16 <= d <= 128 and d % 8 == 0):
        return f"head dim {d} not supported (fused kernels take 16..128 in steps of 8)"
    return None


def check_triton(call: Call) -> Optional[str]:
    dev = _device_type(call)
    if dev == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
    elif dev == "cpu":
        if call.device.type == "cpu" and not triton_interpreter_on():
            return "Triton needs CUDA tensors (CPU tensors run only under TRITON_INTERPRET=1)"
        if not call.explicit:
            return "CPU tensors run Triton (interpreter) only when backend='triton' is asked for"
    else:
        return f"device {call.device.type} not supported"
    if call.dtype not in _TRITON_DTYPES:
        return f"dtype {call.dtype} not supported (float16, bfloat16, float32)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return _fused_head_dim(call)


def check_cpp(call: Call) -> Optional[str]:
    if not _ext.HAS_EXTENSION:
        return "extension dcal._C is not built (it needs a C++ compiler at install: pip install --no-build-isolation .)"
    dev = _device_type(call)
    if dev == "cpu":
        if call.dtype not in _CPP_CPU_DTYPES:
            return f"dtype {call.dtype} not supported on CPU (float32, float64, bfloat16, float16)"
        return None
    if dev == "cuda":
        if call.op != "neighborhood_attention2d":
            return "the C++ backend runs this op on CPU only"
        if not _ext.built_with_cuda():
            return "extension was built without CUDA kernels"
        if call.dtype not in _CUDA_DTYPES:
            return f"dtype {call.dtype} not supported on CUDA (float16, bfloat16, float32)"
        return _fused_head_dim(call)
    return f"device {call.device.type} not supported"


def check_cpp_mkv(call: Call) -> Optional[str]:
    """The C++ multi_kv_attention kernel: CPU only, float32/float64, float16 computed in float32
    (bfloat16 falls to "sdpa")."""
    why = check_cpp(call)
    if why is not None:
        return why
    if _device_type(call) != "cpu":
        return "the C++ backend runs this op on CPU only"
    if call.dtype not in (torch.float32, torch.float64, torch.float16):
        return f"dtype {call.dtype} not supported (float32, float64, float16 on CPU)"
    return None


def check_sdpa(call: Call) -> Optional[str]:
    dev = _device_type(call)
    if dev == "cpu":
        if call.dtype not in _CPU_DTYPES:
            return f"dtype {call.dtype} not supported on CPU (float32, float64, bfloat16)"
        return None
    if dev == "cuda":
        if call.dtype not in _CUDA_DTYPES:
            return f"dtype {call.dtype} not supported on CUDA (float16, bfloat16, float32)"
        return None
    return f"device {call.device.type} not supported"


def check_reference(call: Call) -> Optional[str]:
    return None


# ----------------------------------------------------------------------------- table

_IMPLS: Dict[Tuple[str, str], Impl] = {}


def register(
    op: str,
    backend: str,
    target: str,
    check: Callable[[Call], Optional[str]],
    loader: Optional[Callable[[], Callable]] = None,
) -> None:
    _IMPLS[(op, backend)] = Impl(op, backend, target, check, loader)


# The Triton implementations are imported on first use, not at `import dcal`: defining a
# torch.library.triton_op imports torch._inductor (about a second), and importing the kernels
# imports triton. Each loader is a literal import (see Impl.loader).
def _load_triton_mkv():
    from dcal.ops._triton_pwca import mkv_triton

    return mkv_triton


def _load_triton_na2d():
    from dcal.ops._triton_na2d import na2d_triton

    return na2d_triton


def _load_triton_rollout():
    from dcal.ops._triton_rollout import rollout_triton

    return rollout_triton


register("multi_kv_attention", "triton", "dcal.ops._triton_pwca:mkv_triton", check_triton, _load_triton_mkv)
register("multi_kv_attention", "cpp", "dcal.ops._cpp_mkv:mkv_cpp", check_cpp_mkv)
register("multi_kv_attention", "sdpa", "dcal.ops._sdpa:mkv_sdpa", check_sdpa)
register("multi_kv_attention", "reference", "dcal.ops._reference_impls:mkv_reference", check_reference)
register("neighborhood_attention2d", "triton", "dcal.ops._triton_na2d:na2d_triton", check_triton, _load_triton_na2d)
register("neighborhood_attention2d", "cpp", "dcal.ops._cpp_na2d:na2d_cpp", check_cpp)
register("neighborhood_attention2d", "reference", "dcal.ops._reference_impls:na2d_reference", check_reference)
register("attention_rollout", "triton", "dcal.ops._triton_rollout:rollout_triton", check_triton, _load_triton_rollout)
register("attention_rollout", "cpp", "dcal.ops._cpp_rollout:rollout_cpp", check_cpp)
register("attention_rollout", "reference", "dcal.ops._reference_impls:rollout_reference", check_reference)

# Default order of each op's chain.
ORDER: Dict[str, List[str]] = {
    "multi_kv_attention": ["triton", "cpp", "sdpa", "reference"],
    "neighborhood_attention2d": ["triton", "cpp", "reference"],
    "attention_rollout": ["triton", "cpp", "reference"],
}


def preload(lazy: bool = False) -> None:
    """Import the registered implementations now (see Impl.load); the lazy ones (Triton) only
    when ``lazy`` is true."""
    for impl in _IMPLS.values():
        if lazy or impl.loader is None:
            impl.load()


def _chain(op: str) -> List[str]:
    order = list(ORDER[op])
    pref = os.environ.get("DCAL_BACKEND")
    if pref:
        if pref not in BACKENDS:
            raise ValueError(f"DCAL_BACKEND={pref!r} is not a backend; expected one of {BACKENDS}")
        if pref in order:
            order.remove(pref)
        order.insert(0, pref)
    return order


def _reason(call: Call, backend: str) -> Tuple[Optional[Callable], Optional[str]]:
    impl = _IMPLS.get((call.op, backend))
    if impl is None:
        return None, f"backend {backend!r} does not implement {call.op}"
    why = impl.check(call)
    if why is not None:
        return None, why
    return impl.load()


def choose(call: Call, backend: Optional[str]) -> Tuple[str, Callable]:
    """The (name, implementation) to run ``call`` with."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS} or None")
        call.explicit = True
        fn, why = _reason(call, backend)
        if fn is None:
            raise ValueError(f"backend={backend!r} cannot run {call.op} here: {why}")
        return backend, fn
    for name in _chain(call.op):
        fn, why = _reason(call, name)
        if fn is not None:
            return name, fn
    raise RuntimeError(f"no backend can run {call.op}")  # unreachable: the reference runs anywhere


def explain_call(call: Call, backend: Optional[str] = None) -> str:
    """One line per backend of the chain: chosen, skipped (and why), or not reached."""
    lines = [f"{call.op} on {call.device.type} {call.dtype}, head dim {call.head_dim}:"]
    names = [backend] if backend is not None else _chain(call.op)
    if backend is not None:
        call.explicit = True
    chosen = None
    for name in names:
        if chosen is not None:
            lines.append(f"  {name:<10} not reached")
            continue
        fn, why = _reason(call, name)
        if fn is not None:
            chosen = name
            lines.append(f"  {name:<10} chosen")
        else:
            lines.append(f"  {name:<10} skipped: {why}")
    return "\n".join(lines)
