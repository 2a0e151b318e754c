"""``python -m dcal.check``: the driver. It runs nothing itself: every part runs in a subprocess.

Order: environment block (one subprocess), the correctness grid (one worker subprocess per op
family, restarted past a run that kills it), ``--sanitize`` (the TINY Triton / CUDA C++ subset
under compute-sanitizer), the benchmarks (one subprocess per group), then ``DIR/report.json``
and ``DIR/report.md``. Exit status 1 when any case fails or errors; 2 when the filters select
nothing or no case passed (nothing was checked); 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from dcal.check import grid as G
from dcal.check import report as REPORT

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def child_env(device: str) -> Dict[str, str]:
    """The workers' environment: this dcal first on the path; on CPU the Triton interpreter is
    switched on before anything imports a kernel (it is read when a kernel is decorated); on CUDA
    it is switched off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run(cmd: List[str], env, log_path: str, timeout: float, prefix: Optional[List[str]] = None):
    """Run a child in its own process group; (returncode or None on timeout, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            (prefix or []) + cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def _tail(path: str, n: int = 6) -> str:
    try:
        lines = [l.rstrip() for l in open(path, errors="replace").read().splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def _row_from_id(rid: str, status: str, detail: str, check: str = "run") -> dict:
    parts = rid.split("|")
    op, backend, dtype, shape = (parts + ["?"] * 4)[:4]
    if len(parts) > 4:
        check = parts[4]
    return dict(
        op=op,
        backend=backend,
        device=None,
        dtype=dtype,
        shape=shape,
        check=check,
        status=status,
        max_err=None,
        tol=None,
        seconds=None,
        detail=detail,
        id=rid,
    )


def _describe_rc(rc) -> str:
    if rc is None:
        return "timed out (killed)"
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def run_family(
    family: str, a, env, workdir: str, deadline: float, prefix=None, tag: str = "", env_out: Optional[str] = None
) -> List[dict]:
    """All runs of one family; a run that kills its worker is recorded and the worker restarted."""
    name = f"{family}{tag}"
    out, skipf, log = (os.path.join(workdir, f"{name}.{ext}") for ext in ("jsonl", "skip", "log"))
    for p in (out, skipf):
        if os.path.exists(p):
            os.remove(p)
    cmd = [
        sys.executable,
        "-m",
        "dcal.check.worker",
        "--family",
        family,
        "--device",
        a.device,
        "--out",
        out,
        "--skip",
        skipf,
    ]
    if a.quick:
        cmd.append("--quick")
    for flag, val in (("--ops", a.ops), ("--only", a.only), ("--backends", a.backends), ("--dtypes", a.dtypes)):
        if val:
            cmd += [flag, *val]
    if getattr(a, "tier", None) is not None:
        cmd += ["--tier", str(a.tier)]
    if getattr(a, "no_compile", False):
        cmd.append("--no-compile")
    if a.inject:
        cmd += ["--inject", os.path.abspath(a.inject)]
    crashed_rows: List[dict] = []
    plan: Optional[List[str]] = None
    first, n_started = True, 0
    while True:
        extra = ["--env-out", env_out] if env_out and first else []
        first = False
        rc, _ = _run(cmd + extra, env, log, deadline - time.time(), prefix)
        events = _events(out)
        plan = next((e["ids"] for e in events if e["event"] == "plan"), plan)
        started = [e["id"] for e in events if e["event"] == "start"]
        ended = {e["id"] for e in events if e["event"] == "end"}
        dead = [i for i in started if i not in ended and i not in {r["id"] for r in crashed_rows}]
        if plan is None:  # the worker died before planning (import error, bad filter, ...)
            crashed_rows.append(
                _row_from_id(
                    f"{family}|*|*|*", "error", f"worker {_describe_rc(rc)} before running any case: {_tail(log)}"
                )
            )
            break
        for rid in dead:
            crashed_rows.append(
                _row_from_id(rid, "error", f"worker process {_describe_rc(rc)} during this run: {_tail(log)}")
            )
        done = ended | {r["id"] for r in crashed_rows}
        remaining = [i for i in plan if i not in done]
        if not remaining:
            break
        if rc is None or time.time() >= deadline:
            for rid in remaining:
                crashed_rows.append(_row_from_id(rid, "error", "not run: the time budget of the run was used up"))
            break
        if (rc == 0 and not dead) or len(started) == n_started:  # ended early, or died before any run
            for rid in remaining:
                crashed_rows.append(
                    _row_from_id(
                        rid, "error", f"not run: the worker {_describe_rc(rc)} before reaching it: {_tail(log)}"
                    )
                )
            break
        n_started = len(started)
        with open(skipf, "w") as f:
            f.write("\n".join(sorted(done)))
    rows = [{k: v for k, v in e.items() if k != "event"} for e in _events(out) if e["event"] == "row"]
    for r in rows + crashed_rows:
        r["device"] = a.device
    return rows + crashed_rows


def _events(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path, errors="replace"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return out


# ----------------------------------------------------------------------------- sanitize


def find_sanitizer() -> Optional[str]:
    path = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not path and root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            path = os.path.join(root, "bin", "compute-sanitizer")
    return path


def sanitize(a, env, workdir, deadline, tool_path: Optional[str] = None) -> List[dict]:
    """The TINY cases of the GPU backends (fp16, no compile checks) under compute-sanitizer's
    memcheck and racecheck, one worker per family and tool. ``tool_path`` is for testing this
    function with a stand-in tool on CPU (fp32 there)."""
    dtype = "float16" if a.device == "cuda" else "float32"

    def skip(why):
        return [
            dict(
                op="(all)",
                backend="triton+cpp",
                device=a.device,
                dtype=dtype,
                shape="tiny subset",
                check=f"sanitize:{tool}",
                status="skip",
                max_err=None,
                tol=None,
                seconds=None,
                detail=why,
                id=f"sanitize|{tool}",
            )
            for tool in ("memcheck", "racecheck")
        ]

    if tool_path is None:
        if a.device != "cuda":
            return skip("compute-sanitizer checks CUDA kernels; this run is on CPU")
        tool_path = find_sanitizer()
        if not tool_path:
            return skip(
                "compute-sanitizer not found (on the PATH, $CUDA_HOME/bin or /usr/local/cuda/bin); "
                "it ships with the CUDA toolkit"
            )
    rows = []
    # without the caching allocator every tensor is its own allocation, so an access past a
    # tensor's end is outside any allocation and memcheck sees it
    env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    backends = [b for b in ("triton", "cpp") if not a.backends or b in a.backends]
    sub = argparse.Namespace(
        **{**vars(a), "quick": False, "backends": backends, "dtypes": [dtype], "tier": G.TINY, "no_compile": True}
    )
    for tool in ("memcheck", "racecheck"):
        prefix = [tool_path, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20"]
        for family in G.FAMILIES:
            if a.ops and family not in a.ops and not any(G.FAMILY.get(o) == family for o in a.ops):
                continue
            t0 = time.perf_counter()
            res = run_family(family, sub, env, workdir, deadline, prefix, tag=f".{tool}")
            log = os.path.join(workdir, f"{family}.{tool}.log")
            text = open(log, errors="replace").read() if os.path.exists(log) else ""
            summary, hazards = sanitizer_findings(text)
            bad = [r for r in res if r["status"] in ("fail", "error")]
            ran = [r for r in res if r["status"] != "skip"]
            status = "fail" if (hazards or bad) else ("pass" if ran and summary else "error" if ran else "skip")
            detail = "; ".join(summary[-2:]) or "the tool printed no summary"
            if hazards:
                detail += "; " + " | ".join(hazards[:5])
            if bad:
                detail += f"; {len(bad)} runs failed/errored under the tool (see {os.path.basename(log)})"
            rows.append(
                dict(
                    op=family,
                    backend="triton+cpp",
                    device=a.device,
                    dtype=dtype,
                    shape="tiny subset",
                    check=f"sanitize:{tool}",
                    status=status,
                    max_err=None,
                    tol=None,
                    seconds=round(time.perf_counter() - t0, 2),
                    detail=detail[:800],
                    id=f"{family}|sanitize|{tool}",
                )
            )
    return rows


def sanitizer_findings(text: str):
    """(summary lines, findings) of a compute-sanitizer log: a finding is a non-zero error count
    (``ERROR SUMMARY: N errors``, racecheck's ``(E errors, W warnings)``: errors only; the
    warnings stay in the summary line) or a reported invalid access / race."""
    import re

    summary, found = [], []
    for line in text.splitlines():
        if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line:
            summary.append(line.strip("= ").strip())
            m = re.search(r"ERROR SUMMARY: (\d+) error", line)
            r = re.search(r"\((\d+) errors?, (\d+) warnings?\)", line)
            if (m and int(m.group(1)) > 0) or (r and int(r.group(1)) > 0):
                found.append(line.strip("= ").strip())
        elif line.startswith("========= ") and re.search(r"Invalid|Race reported|hazard detected|out of bounds", line):
            found.append(line[10:].strip())
    return summary, found


# ----------------------------------------------------------------------------- bench


def run_bench(a, env, workdir, deadline) -> List[dict]:
    """Every benchmark group in one process (restarted past a group that kills it)."""
    out, log = os.path.join(workdir, "bench.jsonl"), os.path.join(workdir, "bench.log")
    if os.path.exists(out):
        os.remove(out)
    family_of = {"pwca": "attention", "neighborhood": "neighborhood", "rollout": "rollout"}
    groups = [
        g
        for g in ("peak", "pwca", "neighborhood", "rollout", "train")
        if not a.ops
        or g in ("peak", "train")
        or any(o in (g, family_of[g]) or G.FAMILY.get(o) == family_of[g] for o in a.ops)
    ]
    failed: List[dict] = []
    while groups:
        cmd = [sys.executable, "-m", "dcal.check.bench", "--device", a.device, "--out", out, "--group", *groups]
        if a.quick:
            cmd.append("--quick")
        rc, secs = _run(cmd, env, log, deadline - time.time())
        ev = _events(out)
        done = {e["group_done"] for e in ev if "group_done" in e}
        started = [e["group_start"] for e in ev if "group_start" in e]
        print(f"[dcal.check] bench {', '.join(g for g in groups if g in done)} in {secs:.0f} s", flush=True)
        rest = [g for g in groups if g not in done]
        if not rest:
            break
        dead = next((g for g in started if g not in done and g in rest), rest[0])
        failed.append(
            dict(
                case=dead,
                provider="(group)",
                ms=None,
                peak_mib=None,
                tflops=None,
                share=None,
                status="error",
                detail=f"bench process {_describe_rc(rc)} in this group: {_tail(log)}",
                device=a.device,
                dtype=None,
                flops=None,
            )
        )
        groups = [g for g in rest if g != dead]
        if rc is None or time.time() >= deadline:
            break
    rows = [e for e in _events(out) if "case" in e] + failed
    peaks = {r["dtype"]: r["tflops"] for r in rows if r["case"].startswith("matmul") and r["tflops"]}
    for r in rows:
        p = peaks.get(r.get("dtype"))
        if r.get("tflops") and p:
            r["share"] = float(f"{r['tflops'] / p:.4g}")
    return rows


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    from dcal import _ext

    p = argparse.ArgumentParser(
        prog="python -m dcal.check", description=__doc__.splitlines()[0], epilog=f"This install: {_ext.status()}."
    )
    p.add_argument("--quick", action="store_true", help="the short run (GPU target: 3 minutes; CPU: TINY cases)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", default="dcal-check", help="directory for report.md, report.json and the logs")
    p.add_argument("--no-bench", action="store_true", help="correctness only")
    p.add_argument("--sanitize", action="store_true", help="also run the tiny GPU subset under compute-sanitizer")
    p.add_argument(
        "--ops",
        nargs="+",
        default=None,
        help="families (attention, neighborhood, rollout) or op names (pwca = pwca_attention)",
    )
    p.add_argument("--only", nargs="+", default=None, help="cases whose 'op shape' text contains one of these")
    p.add_argument("--backends", nargs="+", default=None, choices=G.BACKENDS_UNDER_TEST)
    p.add_argument(
        "--dtypes", nargs="+", default=None, help="cpu: float32 float64 bfloat16; cuda: float32 float16 bfloat16"
    )
    p.add_argument(
        "--inject",
        default=None,
        help="TESTING THE CHECKER ONLY: a Python file every worker runs before its cases (e.g. to "
        "patch a backend and see the report catch it); the report says it was used",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds for the whole run (default 1800 on CUDA, 900 on CPU)"
    )
    a = p.parse_args(argv)
    a.device = a.device or _default_device()
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu")
    if a.inject and not os.path.isfile(a.inject):
        p.error(f"--inject {a.inject}: no such file")
    a.tier = None
    # Fail closed: a filter that selects nothing is a usage error (exit 2, one line), not an
    # empty run that would report "PASSED".
    a.ops, why = G.resolve_filters(a.device, a.quick, a.ops, a.only, a.dtypes, a.tier, a.backends)
    if why:
        print(f"python -m dcal.check: error: {why}", file=sys.stderr)
        sys.exit(2)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    t_start, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    deadline = t_start + (a.timeout or (1800 if a.device == "cuda" else 900))
    os.makedirs(a.out, exist_ok=True)
    workdir = os.path.join(a.out, "logs")
    os.makedirs(workdir, exist_ok=True)
    env = child_env(a.device)
    print(f"[dcal.check] device {a.device}{' --quick' if a.quick else ''}; logs in {workdir}", flush=True)

    env_path = os.path.join(workdir, "env.json")
    if os.path.exists(env_path):
        os.remove(env_path)
    cases: List[dict] = []
    for family in G.FAMILIES:
        if a.ops and family not in a.ops and not any(G.FAMILY.get(o) == family for o in a.ops):
            continue
        t0 = time.perf_counter()
        # the first worker also writes the environment block (one interpreter start less)
        rows = run_family(family, a, env, workdir, deadline, env_out=None if os.path.exists(env_path) else env_path)
        counts = REPORT.count(rows)
        print(f"[dcal.check] {family}: {counts} in {time.perf_counter() - t0:.0f} s", flush=True)
        cases += rows
    if a.device == "cuda" and not (a.ops or a.only or a.backends or a.dtypes):
        from dcal.check import multigpu  # the Triton ops on cuda:1 with cuda:0 current (skipped on one GPU)

        cases += multigpu.run_from_driver(a, env, workdir, deadline)
    rc = 0
    if not os.path.exists(env_path):  # no worker ran, or none got that far
        rc, _ = _run(
            [sys.executable, "-m", "dcal.check.env", "--device", a.device, "--out", env_path],
            env,
            os.path.join(workdir, "env.log"),
            300,
        )
    try:
        envblock = json.load(open(env_path))
    except (OSError, json.JSONDecodeError):
        envblock = {"error": f"environment probe {_describe_rc(rc)}: {_tail(os.path.join(workdir, 'env.log'))}"}
    envblock["injected"] = os.path.abspath(a.inject) if a.inject else None
    if a.sanitize:
        cases += sanitize(a, env, workdir, deadline)
    bench = [] if a.no_bench else run_bench(a, env, workdir, deadline)

    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time() - t_start
    est = {}
    for quick in (True, False):
        secs, counts = G.estimate_gpu_seconds(quick)
        est["quick" if quick else "full"] = dict(seconds=round(secs), **counts)
    run = dict(
        argv=sys.argv[1:] if argv is None else list(argv),
        device=a.device,
        quick=a.quick,
        wall_seconds=round(wall, 1),
        cpu_seconds=round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 1),
        gpu_estimate=est,
    )
    data = dict(env=envblock, run=run, cases=cases, bench=bench)
    REPORT.write(a.out, data)
    failed = [r for r in cases if r["status"] in ("fail", "error")]
    verdict = REPORT.verdict(cases)
    print(
        f"[dcal.check] {verdict}: {REPORT.count(cases)}; wall {wall:.0f} s, CPU {run['cpu_seconds']:.0f} s; "
        f"report: {os.path.join(a.out, 'report.md')}",
        flush=True,
    )
    for r in failed[:20]:
        print(
            f"  {r['status'].upper():5} {r['op']} {r['backend']} {r['dtype']} {r['shape']} {r['check']}: {r['detail'][:160]}"
        )
    if verdict == REPORT.NOTHING:
        print(
            "python -m dcal.check: error: no case passed or failed (every selected run was skipped, or none was "
            "selected): nothing was checked",
            file=sys.stderr,
        )
        return 2
    return 1 if failed else 0
