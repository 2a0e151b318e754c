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
* ``"peak"``: the machine's matmul speed: the best fp32 GEMM of several (:func:`matmul_gflops`).
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
from dcal.testing.flops import flops_matmul
from dcal.testing.measure import cpu_peak, cuda_peak, is_oom, proc_status, time_ms


def time_fn(fn: Callable[[], Any], warmup: int = 2, reps: int = 10, cuda: bool = False) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` calls; returns median/min/max in ms.
    (In-process helper; the runner interleaves providers instead.)"""
    for _ in range(warmup):
        fn()
    times = [time_ms(fn, cuda) for _ in range(reps)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _measure_peak(fn: Callable[[], Any], cuda: bool):
    """Peak memory of one call beyond what is live before it, and the call's time in ms."""
    return cuda_peak(fn) if cuda else cpu_peak(fn)


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
                times[name].append(time_ms(fns[name], cuda))
            except BaseException as e:
                failed[name] = "OOM" if is_oom(e) else f"error: {_short(e)}"
        done += 1
    return times, failed


def _cpu_clock_mhz() -> Optional[float]:
    """The nominal clock the kernel reports (``cpu MHz`` of /proc/cpuinfo; under a hypervisor the
    TSC rate, not the turbo clock the cores actually run at)."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), re.M)]
    except OSError:
        return None
    return max(mhz) if mhz else None


# GEMM shapes of the CPU attention kernels' blocks ([M, K] @ [K, N]): the score product of a
# 197-row query block over a 785-key segment at head dim 64, and the probabilities times values.
BLOCK_SHAPES = ((197, 785, 64), (197, 64, 785))
MM_SIZES = (1024, 2048, 3072)


def _median_gflops(fn: Callable[[], Any], flops: float, reps: int, cuda: bool) -> Dict[str, float]:
    for _ in range(2):
        fn()
    times = [time_ms(fn, cuda) for _ in range(reps)]
    med = statistics.median(times)
    return {"gflops": flops / (med * 1e-3) / 1e9, "median_ms": med}


def matmul_gflops(device: str, dtype: str, n: Optional[int] = None, reps: int = 7) -> Dict[str, Any]:
    """The peak the bench divides by: the best fp32 GEMM this machine gives in this process.

    On CUDA: the median GFLOP/s of ``n x n @ n x n`` in the dtype (n 8192 for 16-bit, else 4096).
    On CPU: fp32 whatever the dtype asked, the best of ``torch.mm`` (MKL sgemm) at n = 1024, 2048,
    3072 (or ``n``) and, when the extension is built, oneDNN's brgemm micro-kernel (as the CPU
    kernels call it) on every intra-op thread at the kernels' block shapes (:data:`BLOCK_SHAPES`).
    Also measured, and named beside the peak but not divided by: the FMA peak (independent FMAs on
    the widest vector registers, every thread) and the nominal clock. Returns ``gflops`` (the
    best), ``source`` (which GEMM gave it), ``candidates`` (GFLOP/s of each), ``fma_gflops``,
    ``fma_lanes``, ``clock_mhz``, ``threads``."""
    import torch

    cuda = device.startswith("cuda")
    tdt = getattr(torch, dtype) if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    if cuda:
        if n is None:
            n = 8192 if tdt in (torch.float16, torch.bfloat16) else 4096
        a = torch.randn(n, n, generator=g).to(device=device, dtype=tdt)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=tdt)
        c = torch.empty(n, n, device=device, dtype=tdt)
        r = _median_gflops(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), flops_matmul(n, n, n), reps, True)
        name = f"torch.mm {n}^3"
        return dict(r, n=n, dtype=str(tdt).replace("torch.", ""), source=name, candidates={name: r["gflops"]})
    cands: Dict[str, float] = {}
    detail: Dict[str, float] = {}
    for size in (n,) if n else MM_SIZES:
        a = torch.randn(size, size, generator=g)
        b = torch.randn(size, size, generator=g)
        c = torch.empty(size, size)
        r = _median_gflops(
            lambda a=a, b=b, c=c: torch.mm(a, b, out=c),
            flops_matmul(size, size, size),
            reps if size <= 2048 else 3,
            False,
        )
        cands[f"MKL sgemm (torch.mm {size}^3)"] = r["gflops"]
        detail[f"MKL sgemm (torch.mm {size}^3)"] = r["median_ms"]
        del a, b, c
    out: Dict[str, Any] = {"fma_gflops": None, "fma_lanes": None}
    try:
        from dcal import _ext

        if _ext.HAS_EXTENSION and hasattr(_ext._C, "cpu_peak"):
            for m_, n_, k_ in BLOCK_SHAPES:
                cands[f"oneDNN brgemm [{m_}x{k_}]@[{k_}x{n_}] x{torch.get_num_threads()} threads"] = _ext._C.cpu_peak(
                    "brgemm", m_, n_, k_, 0.5
                )
            lanes = _ext._C.cpu_fma_lanes()
            if lanes:
                out["fma_gflops"] = _ext._C.cpu_peak("fma", 1, 1, 1, 0.3)
                out["fma_lanes"] = lanes
    except Exception as e:  # the peak must not fail the bench: MKL's figure stands alone then
        out["extension_error"] = f"{type(e).__name__}: {e}"
    best = max(cands, key=cands.get)
    size = int(re.search(r"(\d+)\^3", best).group(1)) if "^3" in best else None
    return dict(
        out,
        gflops=cands[best],
        source=best,
        candidates=cands,
        n=size,
        median_ms=detail.get(best),
        dtype="float32",
        clock_mhz=_cpu_clock_mhz(),
        threads=torch.get_num_threads(),
    )


def peak_description(p: Dict[str, Any]) -> str:
    """One line naming the peak of a run and what it was chosen from (for every table)."""
    if not p:
        return ""
    text = f"matmul peak = the best fp32 GEMM of this run: {p['gflops']:.1f} GFLOP/s, {p.get('source', '?')}"
    others = {k: v for k, v in (p.get("candidates") or {}).items() if k != p.get("source")}
    if others:
        text += "; others: " + ", ".join(f"{k} {v:.1f}" for k, v in others.items())
    if p.get("fma_gflops"):
        text += (
            f"; FMA peak (measured, {p['fma_lanes']}-lane fp32 FMA on {p.get('threads', '?')} threads): "
            f"{p['fma_gflops']:.1f} GFLOP/s"
        )
        if p.get("clock_mhz"):
            per_unit = p["clock_mhz"] * 1e-3 * p["fma_lanes"] * 2 * p.get("threads", 1)
            text += (
                f" = {p['fma_gflops'] / per_unit:.2f} FMA/cycle/core at the nominal "
                f"{p['clock_mhz']:.0f} MHz ({per_unit:.1f} GFLOP/s per FMA unit)"
            )
    return text


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
        limit = proc_status().get("VmSize", 0) + spec["max_mem"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    fns = {}
    for name in spec["providers"]:
        emit(provider=name, event="start")
        first_ms = None
        try:
            fn = mod.PROVIDERS[name](case, inputs)
            for i in range(spec["warmup"]):
                ms = time_ms(fn, cuda)
                first_ms = ms if i == 0 else first_ms
            fns[name] = fn
        except Unavailable as e:
            emit(provider=name, event="done", status=f"skipped: {e}")
            continue
        except BaseException as e:  # a provider may fail any way; the run goes on
            emit(provider=name, event="done", status="OOM" if is_oom(e) else f"error: {_short(e)}")
            continue
        if spec["what"] == "memory":
            try:
                peak, call_ms = _measure_peak(fn, cuda)
                emit(
                    provider=name,
                    event="done",
                    status="ok",
                    peak_bytes=peak,
                    call_ms=call_ms,
                    first_ms=first_ms if first_ms is not None else call_ms,
                )
            except BaseException as e:
                emit(provider=name, event="done", status="OOM" if is_oom(e) else f"error: {_short(e)}")
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
            emit(
                provider=name,
                event="done",
                status="ok",
                median_ms=statistics.median(t),
                min_ms=min(t),
                max_ms=max(t),
                times_ms=t,
            )


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
