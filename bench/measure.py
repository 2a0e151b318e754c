"""The measuring process (child side of the runner): peak memory, interleaved timed rounds, matmul peak.

:mod:`bench.runner` starts one such process per measurement from a fork server and reads the JSON
lines it appends to ``spec["out"]``. Three kinds (``spec["what"]``):

* ``"memory"``: one provider: inputs, ``warmup`` calls (the first one timed: ``first_ms``), then one
  call whose peak memory and time (``call_ms``) are recorded. Peak = (CPU) the process's peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its resident set at the
  baseline, with glibc told to serve every allocation >= 64 KiB by its own mapping so that freed
  tensors leave the resident set; (GPU) ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus the memory allocated at the baseline.
* ``"time"``: all providers of a case side by side: ``warmup`` calls each, then rounds, each timing
  one call of every provider in turn (interleaved, so load from other processes hits all alike).
  A fixed number of rounds (``reps``), or, with ``round_budget`` seconds, as many as fit
  (at least ``min_reps``, at most ``max_reps``), judged from the rounds done so far.
* ``"peak"``: the machine's matmul speed: median GFLOP/s of an n x n x n GEMM (sgemm on CPU).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from bench.spec import Case, Unavailable


def time_fn(fn: Callable[[], Any], warmup: int = 2, reps: int = 10, cuda: bool = False) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` calls; returns median/min/max in ms.
    (In-process helper; the runner interleaves providers instead.)"""
    for _ in range(warmup):
        fn()
    times = [_timed(fn, cuda) for _ in range(reps)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _proc_status(pid="self") -> Dict[str, int]:
    """VmRSS, VmHWM, VmSize of a process in bytes (Linux)."""
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


def _release_freed_memory():
    """Give freed heap memory back to the OS so the resident set holds live data only."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("not enough memory" in msg or "can't allocate memory" in msg
                                            or "out of memory" in msg.lower())


def _short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _timed(fn: Callable[[], Any], cuda: bool) -> float:
    """One call of ``fn``, in ms (bracketed by synchronisation on CUDA)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _measure_peak(fn: Callable[[], Any], cuda: bool):
    """Peak memory of one call beyond what is live before it, and the call's time in ms."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = _timed(fn, True)
        return int(torch.cuda.max_memory_allocated() - base), ms
    _release_freed_memory()
    base = _proc_status()["VmRSS"]
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs not writable)")
    ms = _timed(fn, False)
    return max(0, _proc_status()["VmHWM"] - base), ms


def _rounds(fns: Dict[str, Callable[[], Any]], spec: Dict[str, Any], cuda: bool, emit):
    """Interleaved rounds; returns provider -> times and provider -> failure status."""
    times: Dict[str, List[float]] = {n: [] for n in fns}
    failed: Dict[str, str] = {}
    budget = spec.get("round_budget")
    min_reps, max_reps = spec.get("min_reps", 1), spec.get("max_reps") or spec["reps"]
    t_start, done = time.perf_counter(), 0
    while True:
        if budget is None:
            if done >= spec["reps"]:
                break
        else:
            elapsed = time.perf_counter() - t_start
            per_round = elapsed / done if done else 0.0
            if done >= max_reps or (done >= min_reps and elapsed + per_round > budget):
                break
        live = [n for n in fns if n not in failed]
        if not live:
            break
        for name in live:
            emit(provider=name, event="start")
            try:
                times[name].append(_timed(fns[name], cuda))
            except BaseException as e:
                failed[name] = "OOM" if _is_oom(e) else f"error: {_short(e)}"
        done += 1
    return times, failed


def matmul_gflops(device: str, dtype: str, n: Optional[int] = None, reps: int = 7) -> Dict[str, float]:
    """Median GFLOP/s of ``n x n @ n x n`` (2 n^3 FLOPs) in this process: sgemm on CPU (fp32 whatever
    the dtype asked), the dtype's GEMM on CUDA. n: 2048 on CPU, 8192 (16-bit) or 4096 on CUDA."""
    import torch

    cuda = device.startswith("cuda")
    tdt = getattr(torch, dtype) if cuda else torch.float32
    if n is None:
        n = (8192 if tdt in (torch.float16, torch.bfloat16) else 4096) if cuda else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=tdt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=tdt)
    c = torch.empty(n, n, device=device, dtype=tdt)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    for _ in range(2):
        fn()
    times = [_timed(fn, cuda) for _ in range(reps)]
    med = statistics.median(times)
    return {"gflops": 2.0 * n ** 3 / (med * 1e-3) / 1e9, "n": n, "median_ms": med,
            "dtype": str(tdt).replace("torch.", "")}


def _worker(spec: Dict[str, Any]) -> None:
    """Child process: runs one measurement and appends JSON lines to spec['out']."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = open(spec["out"], "a", buffering=1)

    def emit(**kw):
        out.write(json.dumps(kw) + "\n")

    if spec["what"] == "peak":
        emit(event="done", provider="matmul", status="ok", **matmul_gflops(spec["device"], spec["dtype"]))
        return
    # The fork server keeps the sys.path it started with; the bench module may live elsewhere.
    for p in reversed(spec.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    mod = importlib.import_module(spec["module"])
    case = Case(**spec["case"])
    cuda = case.device.startswith("cuda")

    inputs = mod.make_inputs(case)
    if spec["max_mem"] and not cuda:
        # The cap counts from here: address space of the interpreter, torch and the inputs + cap.
        limit = _proc_status().get("VmSize", 0) + spec["max_mem"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    fns = {}
    for name in spec["providers"]:
        emit(provider=name, event="start")
        first_ms = None
        try:
            fn = mod.PROVIDERS[name](case, inputs)
            for i in range(spec["warmup"]):
                ms = _timed(fn, cuda)
                first_ms = ms if i == 0 else first_ms
            fns[name] = fn
        except Unavailable as e:
            emit(provider=name, event="done", status=f"skipped: {e}")
            continue
        except BaseException as e:  # a provider may fail any way; the run goes on
            emit(provider=name, event="done", status="OOM" if _is_oom(e) else f"error: {_short(e)}")
            continue
        if spec["what"] == "memory":
            try:
                peak, call_ms = _measure_peak(fn, cuda)
                emit(provider=name, event="done", status="ok", peak_bytes=peak, call_ms=call_ms,
                     first_ms=first_ms if first_ms is not None else call_ms)
            except BaseException as e:
                emit(provider=name, event="done", status="OOM" if _is_oom(e) else f"error: {_short(e)}")
            del fns[name], fn
        else:
            emit(provider=name, event="ready")
    if spec["what"] != "time":
        return
    times, failed = _rounds(fns, spec, cuda, emit)
    for name in fns:
        if name in failed:
            emit(provider=name, event="done", status=failed[name])
        else:
            t = times[name]
            emit(provider=name, event="done", status="ok", median_ms=statistics.median(t), min_ms=min(t),
                 max_ms=max(t), times_ms=t)


def _mmap_every_allocation():
    """Every allocation >= 64 KiB gets its own mapping, returned to the OS when freed, so the
    resident set follows live tensors (glibc otherwise keeps freed heap pages and raises its
    mapping threshold dynamically)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _child_main(spec: Dict[str, Any]) -> None:
    fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if spec["what"] == "memory":
        _mmap_every_allocation()
    _worker(spec)
