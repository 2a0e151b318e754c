"""The runner (parent side): fork server, one process per measurement, OOM and timeouts, the per-case
time budget, the matmul peak of the run, and the progress lines.

What :func:`run_bench` does for every case of a bench module:

* Processes: every measurement runs in a fresh process forked from a fork server that imported
  torch and dcal once and ran no op (so each starts clean and quickly; a crash or an OOM kill
  takes only that process down). :mod:`bench.measure` is what runs in it.
* Memory: each (case, provider) runs in its OWN process: inputs, warm-up, one measured call (its
  peak memory beyond the inputs, outputs and gradients included, and its time).
* Time, with a budget (the default run, ``--budget`` seconds per case): the memory processes
  measured one call of every provider; from their sum the runner decides
  (:func:`plan_timing`): if warm-up plus ``MIN_REPS`` rounds fit the budget, one process runs all
  providers side by side in interleaved rounds, as many as fit what is left of the budget
  (at most ``MAX_REPS``); otherwise (or for a case declared ``heavy``) the case is measured once
  per provider (time and memory of the same call, no warm-up for heavy cases: their providers
  prepare in their setup) and the table says so. With ``--reps`` or ``--full``: a fixed number
  of warm-up calls and rounds, as before budgets existed.
* Out of memory: ``torch.OutOfMemoryError``, ``MemoryError``, a failed CPU allocation, a process
  killed by SIGKILL (the kernel's OOM killer), or one exceeding the ``--max-mem`` cap (enforced
  with ``RLIMIT_AS`` = address space at the baseline + cap, and by the parent polling the
  child's resident set) gives status ``OOM``; any other exception gives ``error: <message>``;
  a provider raising :class:`~bench.spec.Unavailable` gives ``skipped: <why>``. None of them
  stops the run.
* Peak: once per bench and dtype, a process measures the machine's matmul speed
  (:func:`bench.measure.matmul_gflops`); every row's GFLOP/s is shown as a share of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from bench.measure import _child_main, peak_description
from bench.spec import Case, Result
from dcal.testing.measure import proc_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_REPS = 3  # interleaved rounds below which a median means little: fewer -> one call per provider
MAX_REPS = 50

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


HEAVY_TIMEOUT_FACTOR = 4  # a heavy case's process may run this many --timeout (a loaded machine must not leave holes)


def _spawn(spec: Dict[str, Any], args, cuda: bool, timeout: Optional[float] = None):
    """Runs one measuring process; returns (records, log, returncode, killed reason or None)."""
    timeout = args.timeout if timeout is None else timeout
    paths = []
    for suffix in (".jsonl", ".log"):
        fd, path = tempfile.mkstemp(prefix="dcal-bench-", suffix=suffix)
        os.close(fd)
        paths.append(path)
    spec = dict(
        spec,
        out=paths[0],
        log=paths[1],
        max_mem=args.max_mem,
        threads=getattr(args, "threads", None),
        sys_path=list(sys.path),
    )
    proc = _context().Process(target=_child_main, args=(spec,), daemon=True)
    proc.start()
    t0, killed = time.time(), None
    while proc.is_alive():
        proc.join(0.05)
        if args.max_mem and not cuda:
            rss = proc_status(proc.pid).get("VmRSS", 0)
            if rss > args.max_mem + args.rss_slack:
                killed = "OOM"
        if time.time() - t0 > timeout:
            killed = f"error: timeout after {timeout:.0f} s"
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
    return records, log, proc.exitcode, killed


def _run_child(
    module: str, case: Case, providers: Sequence[str], what: str, args, **extra
) -> Dict[str, Dict[str, Any]]:
    """Runs the worker in a fresh process; returns provider -> final record. A provider that
    was running when the process died (signal, cap, timeout) gets OOM or an error; the providers
    after it are run again in a new process. ``extra`` goes into the worker's spec (warmup,
    reps, round_budget, min_reps, max_reps)."""
    results: Dict[str, Dict[str, Any]] = {}
    todo = list(providers)
    while todo:
        spec = dict(
            module=module, case=dataclasses.asdict(case), providers=todo, what=what, warmup=args.warmup, reps=args.reps
        )
        spec.update(extra)
        timeout = args.timeout * (HEAVY_TIMEOUT_FACTOR if case.heavy else 1)
        records, log, returncode, killed = _spawn(spec, args, case.device.startswith("cuda"), timeout)
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


def matmul_peak(args, device: str, dtype: str) -> Optional[Dict[str, Any]]:
    """The machine's matmul speed now, measured in a fresh process like the cases (same threads)."""
    records, log, returncode, killed = _spawn(
        dict(what="peak", device=device, dtype=dtype), args, device.startswith("cuda")
    )
    done = [r for r in records if r.get("event") == "done"]
    if not done:
        print(f"(matmul peak not measured: {killed or log.strip().splitlines()[-1:] or returncode})")
        return None
    return done[0]


def _module_name(mod) -> str:
    """Importable name of a bench module, also when it runs as ``python -m bench.<name>``."""
    spec = getattr(mod, "__spec__", None)
    return spec.name if spec is not None and spec.name else mod.__name__


def run_cases(mod, args) -> List[Case]:
    """Every case of the bench for these options, before ``--cases``: ``cases(quick, device,
    full=...)`` when the bench distinguishes the default run from ``--full``, else
    ``cases(quick, device)``."""
    kw = {}
    if "full" in inspect.signature(mod.cases).parameters:
        kw["full"] = bool(getattr(args, "full", False))
    return mod.cases(args.quick, args.device, **kw)


def select_cases(mod, args) -> List[Case]:
    """The bench's cases for these options (:func:`run_cases`) that ``--cases`` selects: names, or
    parts of names."""
    out = run_cases(mod, args)
    if not args.cases:
        return out
    names = {c.name for c in out}
    # a pattern that is a case's full name selects that case only ("N785-fwd", not "N785-fwd+bwd")
    return [c for c in out if any(c.name == s if s in names else s in c.name for s in args.cases)]


def plan_timing(
    call_s: Optional[Sequence[float]],
    budget: Optional[float],
    warmup: int,
    heavy: bool = False,
    elapsed: float = 0.0,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
) -> Dict[str, Any]:
    """How to time a case, from one measured call per provider (seconds, ``None`` if unknown).

    Returns ``{"mode": "fixed"}`` (no budget: ``--reps`` rounds), ``{"mode": "single"}`` (one call
    per provider, taken from the memory processes), or ``{"mode": "rounds", "round_budget": s,
    "min_reps": ..., "max_reps": ...}``: interleaved rounds in ``round_budget`` seconds, which is
    what is left of ``budget`` after ``elapsed`` and the warm-up calls, but never less than
    ``min_reps`` rounds' worth."""
    if budget is None:
        return {"mode": "fixed"}
    if call_s is None:  # no memory pass: the timing process judges from its own rounds
        if heavy:
            return {"mode": "rounds", "round_budget": 0.0, "min_reps": 1, "max_reps": 1}
        return {
            "mode": "rounds",
            "round_budget": max(budget - elapsed, 0.0),
            "min_reps": min_reps,
            "max_reps": max_reps,
        }
    per_round = float(sum(call_s))
    if heavy or per_round * (warmup + min_reps) > budget:
        return {"mode": "single"}
    left = budget - elapsed - per_round * warmup
    return {
        "mode": "rounds",
        "round_budget": max(left, per_round * min_reps),
        "min_reps": min_reps,
        "max_reps": max_reps,
    }


class Progress:
    """One line per finished case: elapsed time of the whole run and an estimate of what is left
    (mean time per finished case times the cases left)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def case_done(self, bench: str, case: Case, seconds: float, how: str) -> str:
        self.done += 1
        elapsed = time.time() - self.t0
        left = self.total - self.done
        est = elapsed / self.done * left
        line = (
            f"[{bench}] case {self.done}/{self.total} {case.name}: {seconds:.0f} s ({how}); "
            f"elapsed {_mmss(elapsed)}, about {_mmss(est)} left"
        )
        print(line, flush=True)
        return line


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def _peak_dtype(device: str, dtype: str) -> str:
    return dtype if device.startswith("cuda") else "float32"


def run_bench(mod, args, progress: Optional[Progress] = None) -> List[Result]:
    """Measures every (case, provider) of bench module ``mod``; prints progress."""
    name = _module_name(mod)
    providers = [p for p in mod.PROVIDERS if not args.providers or p in args.providers]
    cases = select_cases(mod, args)
    if progress is None:
        progress = Progress(len(cases))
    budget = getattr(args, "budget", None)
    peaks: Dict[tuple, Optional[Dict[str, Any]]] = {}
    if not getattr(args, "no_peak", False):
        for key in dict.fromkeys((c.device, _peak_dtype(c.device, c.dtype)) for c in cases):
            peaks[key] = p = matmul_peak(args, *key)
            if p:
                print(f"[{mod.NAME}] ({key[0]}) {peak_description(p)}", flush=True)
    flops_for = getattr(mod, "flops_for", None)
    results: List[Result] = []
    for case in cases:
        t_case = time.time()
        load1 = os.getloadavg()[0]
        print(
            f"[{mod.NAME}] {case.name}: {case.shape()} {case.dtype} {case.device}"
            + (f"; budget {budget:.0f} s" if budget is not None else ""),
            flush=True,
        )
        single = budget is not None and case.heavy
        warmup = 0 if single else args.warmup
        mem: Dict[str, Dict[str, Any]] = {}
        if not args.no_memory:
            for p in providers:  # a fresh process per (case, provider)
                mem.update(_run_child(name, case, [p], "memory", args, warmup=warmup))
        runnable = [p for p in providers if mem.get(p, {}).get("status", "ok") == "ok"]
        call_s = None if args.no_memory else [mem[p]["call_ms"] / 1e3 for p in runnable]
        plan = plan_timing(call_s, budget, args.warmup, case.heavy, time.time() - t_case)
        tim: Dict[str, Dict[str, Any]] = {}
        if plan["mode"] == "single":
            for p in runnable:
                ms = mem[p]["call_ms"]
                tim[p] = dict(
                    status="ok",
                    median_ms=ms,
                    min_ms=ms,
                    max_ms=ms,
                    times_ms=[ms],
                    note="1 call (heavy)" if case.heavy else "1 call (over budget)",
                )
            how = "1 call per provider"
        elif runnable:
            extra = {} if plan["mode"] == "fixed" else {k: v for k, v in plan.items() if k != "mode"}
            tim = _run_child(name, case, runnable, "time", args, warmup=0 if single else args.warmup, **extra)
            reps = max((len(t.get("times_ms") or ()) for t in tim.values()), default=0)
            how = f"{reps} rounds" + (f" in a {plan['round_budget']:.0f} s budget" if plan["mode"] == "rounds" else "")
        else:
            how = "nothing runnable"
        for p in providers:
            m, t = mem.get(p, {}), tim.get(p, {})
            status = m.get("status", "ok")
            if status == "ok":
                status = t.get("status", "ok")
            times = t.get("times_ms")
            peak = peaks.get((case.device, _peak_dtype(case.device, case.dtype)))
            results.append(
                Result(
                    case,
                    p,
                    status,
                    t.get("median_ms"),
                    t.get("min_ms"),
                    t.get("max_ms"),
                    m.get("peak_bytes"),
                    times,
                    reps=len(times) if times else 0,
                    note=t.get("note", ""),
                    flops=flops_for(case, p) if flops_for else None,
                    peak_gflops=peak["gflops"] if peak else None,
                    load1=load1,
                    peak_text=peak_description(peak) if peak else "",
                )
            )
        progress.case_done(mod.NAME, case, time.time() - t_case, how)
    return results
