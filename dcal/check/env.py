"""The environment block of the report, collected in a subprocess with the workers' environment.

``python -m dcal.check.env --device cpu|cuda --out env.json``: versions (python, torch, triton,
CUDA runtime and driver), the GPU (name, capability, memory), the host, whether ``dcal._C``
loaded, whether its CUDA kernels are compiled in and which device kernels each ``dcal::`` op has,
and the backend chain of every op for every dtype of the device (``dcal.ops.explain``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return _run(["git", "-C", here, "rev-parse", "--short", "HEAD"]) or "unknown"


def collect(device: str) -> dict:
    import torch

    import dcal
    import dcal.ops
    from dcal import _ext
    from dcal.check import grid as G

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dcal": dcal.__version__,
        "dcal_commit": git_commit(),
        "device": device,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "DCAL_BACKEND": os.environ.get("DCAL_BACKEND"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"not installed ({e})"
    env["cuda_available"] = torch.cuda.is_available()
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            sm_count=p.multi_processor_count,
        )
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        env["driver"] = smi[0].strip() if smi else "unknown (nvidia-smi not found)"
        try:
            env["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001
            env["cudnn"] = None
    from dcal.ops import _dispatch

    _dispatch.preload(lazy=True)  # the Triton ops register on first use: list them too
    env["extension"] = {
        "loaded": _ext.HAS_EXTENSION,
        "error": _ext.EXTENSION_ERROR,
        "built_with_cuda": _ext.built_with_cuda(),
        "ops": _op_kernels(),
    }
    env["compute_sanitizer"] = shutil.which("compute-sanitizer") or _cuda_home_tool("compute-sanitizer")
    env["natten"] = _version("natten")
    chains = {}
    for op in ("pwca_attention", "neighborhood_attention2d", "attention_rollout"):
        for dt in G.DTYPES[device]:
            shape = (1, 1, 1, 1, 64) if op == "neighborhood_attention2d" else (1, 1, 1, 64)
            t = torch.empty(shape, device=device, dtype=getattr(torch, dt))
            chains[f"{op} {dt}"] = dcal.ops.explain(op, t)
    env["chains"] = chains
    return env


def _op_kernels() -> dict:
    """For every ``dcal::`` op, the dispatch keys it has a kernel for (CPU, CUDA, Meta, ...)."""
    import torch

    out = {}
    names = sorted(n for n in dir(torch.ops.dcal) if not n.startswith("_") and n != "name")
    for n in names:
        keys = []
        for key in ("CPU", "CUDA", "Meta", "Autograd", "CompositeImplicitAutograd"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"dcal::{n}", key):
                    keys.append(key)
            except RuntimeError:
                pass
        out[n] = keys
    return out


def _cuda_home_tool(name: str):
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    return None


def _version(mod: str):
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001  (not installed)
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.check.env")
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with open(a.out, "w") as f:
        json.dump(collect(a.device), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
