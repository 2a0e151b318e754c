"""Shared machinery of the dcal benchmarks (DESIGN section 9).

A bench script is a module of plain functions; this file runs it, measures, prints, saves.

Writing a bench script (``bench/<name>.py``)::

    import sys
    from bench.common import Case, Unavailable, bench_main, flops_attention

    NAME = "pwca"                          # results go to bench/results/pwca.{csv,png}
    BASELINE = "sdpa_cat"                  # optional: ratio columns are relative to it
    X_LABEL = "tokens"                     # optional: x axis of the plot

    def cases(quick: bool, device: str) -> list[Case]:
        # one Case per measured point; params must be JSON-serialisable
        return [Case(name="N785-fwd", params=dict(B=2, H=12, N=785, D=64), dtype="float32",
                     device=device, mode="fwd", flops=flops_attention(2, 12, 785, 1570, 64),
                     x=785, group="fwd")]

    def make_inputs(case: Case):
        # built once per process before any provider runs; counted in the memory baseline
        ...

    def naive(case, inputs):               # a provider: returns the zero-argument callable
        q, k, v = inputs                   # that is timed (raise Unavailable("why") to skip)
        return lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v

    PROVIDERS = {"naive": naive, ...}      # ordered: the table and the plot keep this order

    def describe(device: str) -> str:      # optional: printed before the run
        ...

    if __name__ == "__main__":
        bench_main(sys.modules[__name__])  # python -m bench.<name> [--quick] [...]

What :func:`run_bench` does for every case:

* Processes: every measurement runs in a fresh process forked from a fork server that imported
  torch and dcal once and ran no op (so each starts clean and quickly; a crash or an OOM kill
  takes only that process down).
* Memory: each (case, provider) runs in its OWN fresh process: inputs are made, the provider's
  callable is warmed up (so one-off costs such as ``torch.compile`` or kernel caches are not
  counted), freed memory is returned to the OS, the baseline is taken, then one measured call.
  Peak = (CPU) the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident set at the baseline, with glibc told to serve
  every allocation >= 64 KiB by its own mapping so that freed tensors leave the resident set;
  (GPU) ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory
  allocated at the baseline. Either way: the extra memory one call needs beyond its inputs
  (outputs and gradients included).
* Time: one process per case runs all providers that passed the memory run side by side:
  ``--warmup`` calls each, then ``--reps`` rounds, each round timing one call of every provider
  in turn (interleaved, so load from other processes hits all providers alike). Reported:
  median, min, max (ms), TFLOP/s = ``case.flops`` / median, and, against the bench's
  ``BASELINE`` provider, the median over rounds of the per-round time ratio (:func:`time_ratio`).
  On CUDA each call is bracketed by ``torch.cuda.synchronize()``.
* Out of memory: ``torch.OutOfMemoryError``, ``MemoryError``, a failed CPU allocation, a
  process killed by SIGKILL (the kernel's OOM killer), or one exceeding the ``--max-mem`` cap
  (enforced with ``RLIMIT_AS`` = address space at the baseline + cap, and by the parent polling
  the child's resident set) gives status ``OOM``; any other exception gives
  ``error: <message>``; a provider raising :class:`Unavailable` gives ``skipped: <why>``. None
  of them stops the run.

Output: a printed table per bench; ``bench/results/<name>[-quick].csv`` with one row per (case,
provider): bench, case, provider, mode, dtype, shape, device, device name, torch / triton
versions, git commit, threads, FLOPs, median/min/max ms, TFLOP/s, peak memory (MiB), time and
memory relative to the baseline provider, status;
and ``bench/results/<name>[-quick].png`` (time and peak memory against ``case.x``, one row of
panels per ``case.group``).

Public helpers: :class:`Case`, :class:`Unavailable`, :class:`Result`, :func:`time_fn`,
:func:`bench_main`, :func:`run_and_report`, :func:`run_bench`, :func:`print_table`, :func:`time_ratio`,
:func:`write_csv`, :func:`plot`, :func:`flops_attention`, :func:`environment`, :func:`parse_mem`,
:func:`make_parser`, :func:`finish_args`.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import importlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- declarations


@dataclass
class Case:
    """One measured point of a bench.

    name: short unique id ("N785-fwd+bwd"); params: shape and options, JSON-serialisable, read by
    the bench's ``make_inputs`` and providers; dtype: "float32", ...; device: "cpu" or "cuda";
    mode: "fwd" or "fwd+bwd" (informational); flops: floating-point operations of one call (for
    TFLOP/s; 0 if not meaningful); x: the value plotted on the x axis; group: cases of one group
    share a plot panel.
    """

    name: str
    params: Dict[str, Any]
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "fwd"
    flops: float = 0.0
    x: float = 0.0
    group: str = ""

    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


class Unavailable(Exception):
    """Raised by a provider's setup when it cannot run here (reported as ``skipped: <why>``)."""


@dataclass
class Result:
    """One (case, provider) outcome. Times in ms, memory in bytes; None when not measured."""

    case: Case
    provider: str
    status: str = "ok"  # "ok", "OOM", "skipped: ...", "error: ..."
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    peak_bytes: Optional[int] = None
    times_ms: Optional[List[float]] = None  # one per round, in the order of the rounds

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tflops(self) -> Optional[float]:
        if self.median_ms is None or not self.case.flops:
            return None
        return self.case.flops / (self.median_ms * 1e-3) / 1e12


def flops_attention(batch: int, heads: int, nq: int, nk: int, head_dim: int, mode: str = "fwd") -> float:
    """FLOPs of exact attention of nq queries over nk keys: two matmuls (QK^T, PV) of
    2*nq*nk*D each forward; the backward does five such matmuls (recomputed QK^T, dV, dP, dQ, dK),
    so fwd+bwd counts 2 + 5 = 7 (the convention of FlashAttention's benchmarks: bwd = 2.5 x fwd)."""
    fwd = 4.0 * batch * heads * nq * nk * head_dim
    return fwd if mode == "fwd" else 3.5 * fwd


# ----------------------------------------------------------------------------- measuring


def time_fn(fn: Callable[[], Any], warmup: int = 2, reps: int = 10, cuda: bool = False) -> Dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` calls; returns median/min/max in ms.
    (In-process helper; :func:`run_bench` interleaves providers instead.)"""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
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


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


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


def parse_mem(text: str) -> int:
    """'8G', '512M', '2048' (MiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"--max-mem must look like 8G, 512M or 2048 (MiB), got {text!r}")
    mult = {"": MIB, "k": 1024, "m": MIB, "g": 1024 * MIB, "t": 1024 ** 2 * MIB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


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


# ----------------------------------------------------------------------------- worker (child side)


def _worker(spec: Dict[str, Any]) -> None:
    """Child process: runs providers of one case and appends JSON lines to spec['out']."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # The fork server keeps the sys.path it started with; the bench module may live elsewhere.
    for p in reversed(spec.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    mod = importlib.import_module(spec["module"])
    case = Case(**spec["case"])
    cuda = case.device.startswith("cuda")
    out = open(spec["out"], "a", buffering=1)

    def emit(**kw):
        out.write(json.dumps(kw) + "\n")

    inputs = mod.make_inputs(case)
    if spec["max_mem"] and not cuda:
        # The cap counts from here: address space of the interpreter, torch and the inputs + cap.
        limit = _proc_status().get("VmSize", 0) + spec["max_mem"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    fns = {}
    for name in spec["providers"]:
        emit(provider=name, event="start")
        try:
            fn = mod.PROVIDERS[name](case, inputs)
            for _ in range(spec["warmup"]):
                fn()
            fns[name] = fn
        except Unavailable as e:
            emit(provider=name, event="done", status=f"skipped: {e}")
            continue
        except BaseException as e:  # a provider may fail any way; the run goes on
            emit(provider=name, event="done", status="OOM" if _is_oom(e) else f"error: {_short(e)}")
            continue
        if spec["what"] == "memory":
            try:
                emit(provider=name, event="done", status="ok", peak_bytes=_measure_peak(fn, cuda))
            except BaseException as e:
                emit(provider=name, event="done", status="OOM" if _is_oom(e) else f"error: {_short(e)}")
            del fns[name], fn
        else:
            emit(provider=name, event="ready")
    if spec["what"] != "time":
        return
    times: Dict[str, List[float]] = {n: [] for n in fns}
    failed: Dict[str, str] = {}
    for _ in range(spec["reps"]):
        for name, fn in fns.items():
            if name in failed:
                continue
            emit(provider=name, event="start")
            try:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except BaseException as e:
                failed[name] = "OOM" if _is_oom(e) else f"error: {_short(e)}"
    for name in fns:
        if name in failed:
            emit(provider=name, event="done", status=failed[name])
        else:
            t = times[name]
            emit(provider=name, event="done", status="ok", median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t),
                 times_ms=t)


def _measure_peak(fn: Callable[[], Any], cuda: bool) -> int:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    _release_freed_memory()
    base = _proc_status()["VmRSS"]
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs not writable)")
    fn()
    return max(0, _proc_status()["VmHWM"] - base)


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


# ----------------------------------------------------------------------------- runner (parent side)


_CONTEXT = None


def _context():
    """The fork server all measuring processes start from: it imports torch and dcal once, runs
    no op (so no thread pool or CUDA context is forked), and forks a fresh child per request."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        _CONTEXT = multiprocessing.get_context("forkserver")
        # Not the bench module itself: it may be the __main__ of the parent (python -m bench.x).
        _CONTEXT.set_forkserver_preload(["torch", "dcal.ops", "bench.common"])
    return _CONTEXT


def _run_child(module: str, case: Case, providers: Sequence[str], what: str, args) -> Dict[str, Dict[str, Any]]:
    """Runs the worker in a fresh process; returns provider -> final record. A provider that
    was running when the process died (signal, cap, timeout) gets OOM or an error; the providers
    after it are run again in a new process."""
    results: Dict[str, Dict[str, Any]] = {}
    todo = list(providers)
    while todo:
        paths = []
        for suffix in (".jsonl", ".log"):
            fd, path = tempfile.mkstemp(prefix="dcal-bench-", suffix=suffix)
            os.close(fd)
            paths.append(path)
        spec = dict(module=module, case=dataclasses.asdict(case), providers=todo, what=what,
                    warmup=args.warmup, reps=args.reps, max_mem=args.max_mem, out=paths[0], log=paths[1],
                    threads=getattr(args, "threads", None), sys_path=list(sys.path))
        proc = _context().Process(target=_child_main, args=(spec,), daemon=True)
        proc.start()
        t0, killed = time.time(), None
        while proc.is_alive():
            proc.join(0.05)
            if args.max_mem and not case.device.startswith("cuda"):
                rss = _proc_status(proc.pid).get("VmRSS", 0)
                if rss > args.max_mem + args.rss_slack:
                    killed = "OOM"
            if time.time() - t0 > args.timeout:
                killed = f"error: timeout after {args.timeout:.0f} s"
            if killed:
                proc.kill()
                proc.join()
                break
        with open(paths[0]) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(paths[1]) as f:
            log = f.read()
        for path in paths:
            os.unlink(path)
        returncode = proc.exitcode
        current = None
        for r in records:
            if r["event"] == "start":
                current = r["provider"]
            elif r["event"] == "done":
                results[r["provider"]] = r
                current = None
        if returncode != 0 or killed:
            if killed:
                why = killed
            elif returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
                why = "OOM"  # the kernel's OOM killer sends SIGKILL
            else:
                tail = " ".join(log.strip().splitlines()[-1:]) or f"exit code {returncode}"
                why = f"error: process died ({tail[:140]})"
            if current is None:  # died outside a provider (imports, inputs)
                for p in todo:
                    results.setdefault(p, {"status": why})
                break
            results[current] = {"status": why}
        left = [p for p in todo if p not in results]
        if left == todo:  # no progress: the child exited without reporting
            for p in left:
                results[p] = {"status": "error: the measuring process reported nothing"}
            break
        todo = left  # after a death, the providers not yet measured run in a new process
    return results


def _module_name(mod) -> str:
    """Importable name of a bench module, also when it runs as ``python -m bench.<name>``."""
    spec = getattr(mod, "__spec__", None)
    return spec.name if spec is not None and spec.name else mod.__name__


def run_bench(mod, args) -> List[Result]:
    """Measures every (case, provider) of bench module ``mod``; prints progress."""
    name = _module_name(mod)
    providers = [p for p in mod.PROVIDERS if not args.providers or p in args.providers]
    results: List[Result] = []
    for case in mod.cases(args.quick, args.device):
        if args.cases and not any(c in case.name for c in args.cases):
            continue
        print(f"[{mod.NAME}] {case.name}: {case.shape()} {case.dtype} {case.device}", flush=True)
        mem: Dict[str, Dict[str, Any]] = {}
        if not args.no_memory:
            for p in providers:  # a fresh process per (case, provider)
                mem.update(_run_child(name, case, [p], "memory", args))
        runnable = [p for p in providers if mem.get(p, {}).get("status", "ok") == "ok"]
        tim = _run_child(name, case, runnable, "time", args) if runnable else {}
        for p in providers:
            m, t = mem.get(p, {}), tim.get(p, {})
            status = m.get("status", "ok")
            if status == "ok":
                status = t.get("status", "ok")
            results.append(Result(case, p, status, t.get("median_ms"), t.get("min_ms"), t.get("max_ms"),
                                  m.get("peak_bytes"), t.get("times_ms")))
    return results


# ----------------------------------------------------------------------------- reporting


def environment(device: str = "cpu", threads: Optional[int] = None) -> Dict[str, str]:
    """Device name, versions and git commit for the CSV."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + "+dirty") if commit and dirty else (commit or "unknown")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"device_name": name, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "threads": str(threads or torch.get_num_threads())}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        return f"{m.group(1).strip()} ({os.cpu_count()} cores)" if m else "cpu"
    except OSError:
        return "cpu"


def time_ratio(r: Result, base: Result) -> float:
    """Time of ``r`` relative to ``base``: the median over rounds of the ratio of the two calls of
    one round (interleaved calls see the same machine load, so this is steadier than a ratio of
    medians on a shared machine); the ratio of medians when per-round times are missing."""
    if r.times_ms and base.times_ms and len(r.times_ms) == len(base.times_ms):
        return statistics.median(a / b for a, b in zip(r.times_ms, base.times_ms))
    return r.median_ms / base.median_ms


def _fmt(v, spec):
    if v is None:
        width = re.match(r"\d*", spec).group(0)
        return format("-", f">{width}") if width else "-"
    return format(v, spec)


def print_table(name: str, results: List[Result], baseline: Optional[str] = None) -> str:
    """Prints (and returns) one block per case: time, spread, TFLOP/s, peak memory, ratios."""
    lines = [f"== {name} =="]
    by_case: Dict[str, List[Result]] = {}
    for r in results:
        by_case.setdefault(r.case.name, []).append(r)
    hdr = (f"  {'provider':<14}{'median ms':>11}{'min..max ms':>19}{'TFLOP/s':>9}{'peak MiB':>10}"
           f"{'t/base':>8}{'m/base':>8}  status")
    for cname, rs in by_case.items():
        c = rs[0].case
        lines.append(f"{cname}  ({c.shape()}, {c.dtype}, {c.device}, {c.mode}, {c.flops / 1e9:.2f} GFLOP)")
        lines.append(hdr)
        base = next((r for r in rs if r.provider == baseline and r.ok), None)
        for r in rs:
            spread = "-" if r.min_ms is None else f"{r.min_ms:.2f}..{r.max_ms:.2f}"
            peak = None if r.peak_bytes is None else r.peak_bytes / MIB
            tr = mr = None
            if base is not None and r.ok:
                if r.median_ms is not None and base.median_ms:
                    tr = time_ratio(r, base)
                if r.peak_bytes is not None and base.peak_bytes:
                    mr = r.peak_bytes / base.peak_bytes
            lines.append(f"  {r.provider:<14}{_fmt(r.median_ms, '11.2f')}{spread:>19}{_fmt(r.tflops, '9.3f')}"
                         f"{_fmt(peak, '10.1f')}{_fmt(tr, '8.2f')}{_fmt(mr, '8.2f')}  {r.status}")
    if baseline:
        lines.append(f"(t/base: median over rounds of the time ratio to '{baseline}' in the same round; "
                     f"m/base: peak memory ratio)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


CSV_FIELDS = ["bench", "case", "provider", "mode", "dtype", "shape", "device", "device_name", "torch", "triton",
              "commit", "threads", "flops", "median_ms", "min_ms", "max_ms", "tflops", "peak_mib", "time_vs_base",
              "mem_vs_base", "status"]


def _num(v, spec) -> str:
    return "" if v is None else format(v, spec)


def write_csv(path: str, name: str, results: List[Result], env: Dict[str, str], baseline: Optional[str] = None) -> str:
    """One row per (case, provider); overwrites ``path``. ``time_vs_base``/``mem_vs_base``: see
    :func:`time_ratio`; empty without a baseline."""
    bases = {r.case.name: r for r in results if r.provider == baseline and r.ok}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            base = bases.get(r.case.name)
            tr = time_ratio(r, base) if base is not None and r.ok and r.median_ms is not None else None
            mr = (r.peak_bytes / base.peak_bytes if base is not None and r.ok and r.peak_bytes is not None
                  and base.peak_bytes else None)
            w.writerow({
                "bench": name, "case": r.case.name, "provider": r.provider, "mode": r.case.mode,
                "dtype": r.case.dtype, "shape": r.case.shape(), "device": r.case.device,
                "device_name": env["device_name"], "torch": env["torch"], "triton": env["triton"],
                "commit": env["commit"], "threads": env["threads"], "flops": f"{r.case.flops:.6g}",
                "median_ms": _num(r.median_ms, ".4f"), "min_ms": _num(r.min_ms, ".4f"),
                "max_ms": _num(r.max_ms, ".4f"), "tflops": _num(r.tflops, ".5f"),
                "peak_mib": _num(None if r.peak_bytes is None else r.peak_bytes / MIB, ".2f"),
                "time_vs_base": _num(tr, ".4f"), "mem_vs_base": _num(mr, ".4f"), "status": r.status,
            })
    return path


def plot(path: str, name: str, results: List[Result], x_label: str = "case.x") -> Optional[str]:
    """Time (with min..max bars) and peak memory against ``case.x``, a row of panels per group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[{name}] matplotlib not installed: no plot (pip install matplotlib)")
        return None
    groups = list(dict.fromkeys(r.case.group for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        for p in providers:
            rs = sorted((r for r in results if r.case.group == g and r.provider == p and r.ok), key=lambda r: r.case.x)
            tr = [r for r in rs if r.median_ms is not None]
            if tr:
                med = [r.median_ms for r in tr]
                err = [[m - r.min_ms for m, r in zip(med, tr)], [r.max_ms - m for m, r in zip(med, tr)]]
                axes[gi][0].errorbar([r.case.x for r in tr], med, yerr=err, marker="o", capsize=3, label=p)
            mr = [r for r in rs if r.peak_bytes is not None]
            if mr:
                axes[gi][1].plot([r.case.x for r in mr], [r.peak_bytes / MIB for r in mr], marker="o", label=p)
            for r in results:
                if r.case.group == g and r.provider == p and r.status == "OOM":
                    axes[gi][1].annotate(f"{p}: OOM", (r.case.x, 0), textcoords="offset points", xytext=(0, 5),
                                         fontsize=7)
        axes[gi][0].set_title(f"{name} {g}: time (median, min..max)")
        axes[gi][0].set_ylabel("ms")
        axes[gi][1].set_title(f"{name} {g}: peak memory beyond inputs")
        axes[gi][1].set_ylabel("MiB")
        for ax in axes[gi]:
            ax.grid(alpha=0.3)
            if ax.lines or ax.containers:
                ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(x_label)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def make_parser(prog: str = "bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--quick", action="store_true", help="small shapes (seconds, for smoke tests)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    p.add_argument("--max-mem", default=None,
                   help="memory cap per measuring process, e.g. 8G (default: half the available memory)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measuring process before it is killed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the measuring processes")
    p.add_argument("--providers", nargs="*", default=None, help="only these providers")
    p.add_argument("--cases", nargs="*", default=None, help="only cases whose name contains one of these")
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes (time only)")
    p.add_argument("--out", default=RESULTS_DIR, help="output directory (default bench/results)")
    p.add_argument("--no-plot", action="store_true")
    return p


def finish_args(args) -> argparse.Namespace:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.reps is None:
        args.reps = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.max_mem is None:
        avail = _mem_available()
        args.max_mem = avail // 2 if avail else 0
    elif not isinstance(args.max_mem, int):
        args.max_mem = parse_mem(args.max_mem)
    # The parent's resident-set check counts the interpreter and torch too (RLIMIT_AS in the
    # child counts from the baseline), so it allows this much on top of the cap.
    args.rss_slack = getattr(args, "rss_slack", 1024 * MIB)
    return args


def bench_main(mod, argv: Optional[Sequence[str]] = None) -> List[Result]:
    """Command line of one bench script: measure, print, write CSV and PNG."""
    args = finish_args(make_parser(f"python -m {_module_name(mod)}").parse_args(argv))
    return run_and_report(mod, args)


def run_and_report(mod, args) -> List[Result]:
    """Runs a bench (see :func:`run_bench`), prints its table, writes CSV and PNG. An optional
    ``describe(device) -> str`` of the bench module is printed first (e.g. the chosen backend)."""
    if hasattr(mod, "describe"):
        print(mod.describe(args.device), flush=True)
    results = run_bench(mod, args)
    if not results:
        print(f"[{mod.NAME}] no case selected")
        return results
    print_table(mod.NAME, results, getattr(mod, "BASELINE", None))
    stem = os.path.join(args.out, mod.NAME + ("-quick" if args.quick else ""))
    env = environment(args.device, getattr(args, "threads", None))
    csv_path = write_csv(stem + ".csv", mod.NAME, results, env, getattr(mod, "BASELINE", None))
    print(f"[{mod.NAME}] wrote {csv_path}")
    if not args.no_plot:
        png = plot(stem + ".png", mod.NAME, results, getattr(mod, "X_LABEL", "case.x"))
        if png:
            print(f"[{mod.NAME}] wrote {png}")
    return results


if __name__ == "__main__":
    sys.exit("bench/common.py is a library; run `python -m bench [--quick] [names...]`")
