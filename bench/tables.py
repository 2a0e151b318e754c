"""Printed tables and CSV files of bench results, with the environment (device, versions, commit, load).

Every row: median and spread of the time, the rounds behind it, achieved GFLOP/s and its share of
the matmul peak measured in the same run, peak memory beside the op's memory floor, and time and
memory relative to the case's baseline provider.
"""

from __future__ import annotations

import csv
import datetime
import os
import re
import statistics
import subprocess
from typing import Dict, List, Optional

from bench.spec import MIB, Result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        return m.group(1).strip() if m else "cpu"
    except OSError:
        return "cpu"


def _cpu_name() -> str:
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            # the bench's own CSVs (bench/results, tracked) are written during the run: not a change of the code measured
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (commit + "+dirty") if commit and dirty else (commit or "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str = "cpu", threads: Optional[int] = None) -> Dict[str, str]:
    """Device name, versions, git commit, date (UTC) and load average for the CSV."""
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
    return {
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "threads": str(threads or torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def time_ratio(r: Result, base: Result) -> float:
    """Time of ``r`` relative to ``base``: the median over rounds of the ratio of the two calls of
    one round (interleaved calls see the same machine load, so this is steadier than a ratio of
    medians on a shared machine); the ratio of medians when per-round times are missing."""
    if r.times_ms and base.times_ms and len(r.times_ms) == len(base.times_ms):
        return statistics.median(a / b for a, b in zip(r.times_ms, base.times_ms))
    return r.median_ms / base.median_ms


def baseline_of(case, default: Optional[str]) -> Optional[str]:
    return case.baseline or default


def ratios(r: Result, base: Optional[Result]):
    """(time ratio, memory ratio) of ``r`` to its case's baseline result; None where not defined."""
    tr = mr = None
    if base is not None and base.ok and r.ok:
        if r.median_ms is not None and base.median_ms:
            tr = time_ratio(r, base)
        if r.peak_bytes is not None and base.peak_bytes:
            mr = r.peak_bytes / base.peak_bytes
    return tr, mr


def _bases(results: List[Result], baseline: Optional[str]) -> Dict[str, Result]:
    return {r.case.name: r for r in results if r.provider == baseline_of(r.case, baseline)}


def _fmt(v, spec):
    if v is None:
        width = re.match(r"\d*", spec).group(0)
        return format("-", f">{width}") if width else "-"
    return format(v, spec)


def print_table(name: str, results: List[Result], baseline: Optional[str] = None, flops_formula: str = "") -> str:
    """Prints (and returns) one block per case: time, spread, rounds, GFLOP/s and share of the
    matmul peak, peak memory and the op's floor, ratios to the baseline, status."""
    lines = [f"== {name} =="]
    peak = next((r.peak_gflops for r in results if r.peak_gflops), None)
    if peak:
        text = next((r.peak_text for r in results if r.peak_text), "")
        lines.append(text or f"matmul peak of this run: {peak:.1f} GFLOP/s")
        lines.append(f"%peak = achieved GFLOP/s / {peak:.1f} GFLOP/s (the best fp32 GEMM of this run)")
    if flops_formula:
        lines.append(f"FLOPs: {flops_formula}")
    by_case: Dict[str, List[Result]] = {}
    for r in results:
        by_case.setdefault(r.case.name, []).append(r)
    bases = _bases(results, baseline)
    hdr = (
        f"  {'provider':<16}{'median ms':>11}{'min..max ms':>21}{'reps':>5}{'GFLOP/s':>9}{'%peak':>7}"
        f"{'peak MiB':>10}{'floor MiB':>10}{'t/base':>8}{'m/base':>8}  status"
    )
    for cname, rs in by_case.items():
        c = rs[0].case
        lines.append(
            f"{cname}  ({c.shape()}, {c.dtype}, {c.device}, {c.mode}, {c.flops / 1e9:.2f} GFLOP"
            f"{', baseline ' + baseline_of(c, baseline) if baseline_of(c, baseline) else ''})"
        )
        lines.append(hdr)
        base = bases.get(cname)
        floor = c.floor_bytes / MIB if c.floor_bytes else None
        for r in rs:
            spread = "-" if r.min_ms is None else f"{r.min_ms:.2f}..{r.max_ms:.2f}"
            peak_mib = None if r.peak_bytes is None else r.peak_bytes / MIB
            tr, mr = ratios(r, base)
            share = None if r.share is None else 100 * r.share
            status = r.status + (f" ({r.note})" if r.note else "")
            lines.append(
                f"  {r.provider:<16}{_fmt(r.median_ms, '11.2f')}{spread:>21}{r.reps or '-':>5}"
                f"{_fmt(r.gflops, '9.1f')}{_fmt(share, '6.1f')}%{_fmt(peak_mib, '10.1f')}"
                f"{_fmt(floor, '10.1f')}{_fmt(tr, '8.2f')}{_fmt(mr, '8.2f')}  {status}"
            )
    if baseline:
        lines.append(
            f"(t/base: median over rounds of the time ratio to the baseline ('{baseline}' unless the case "
            f"names another) in the same round; m/base: peak memory ratio; floor: outputs (+ gradients))"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


CSV_FIELDS = [
    "bench",
    "case",
    "provider",
    "mode",
    "dtype",
    "shape",
    "device",
    "device_name",
    "torch",
    "triton",
    "commit",
    "threads",
    "date",
    "load1",
    "flops",
    "median_ms",
    "min_ms",
    "max_ms",
    "reps",
    "note",
    "tflops",
    "gflops",
    "peak_gflops",
    "peak_source",
    "share_of_peak",
    "peak_mib",
    "floor_mib",
    "baseline",
    "time_vs_base",
    "mem_vs_base",
    "status",
]


def _num(v, spec) -> str:
    return "" if v is None else format(v, spec)


def write_csv(path: str, name: str, results: List[Result], env: Dict[str, str], baseline: Optional[str] = None) -> str:
    """One row per (case, provider); overwrites ``path``. ``time_vs_base``/``mem_vs_base``: see
    :func:`time_ratio`; empty without a baseline."""
    bases = _bases(results, baseline)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            tr, mr = ratios(r, bases.get(r.case.name))
            w.writerow(
                {
                    "bench": name,
                    "case": r.case.name,
                    "provider": r.provider,
                    "mode": r.case.mode,
                    "dtype": r.case.dtype,
                    "shape": r.case.shape(),
                    "device": r.case.device,
                    "device_name": env["device_name"],
                    "torch": env["torch"],
                    "triton": env["triton"],
                    "commit": env["commit"],
                    "threads": env["threads"],
                    "date": env.get("date", ""),
                    "load1": _num(r.load1, ".2f"),
                    "flops": f"{r.call_flops:.6g}",
                    "median_ms": _num(r.median_ms, ".4f"),
                    "min_ms": _num(r.min_ms, ".4f"),
                    "max_ms": _num(r.max_ms, ".4f"),
                    "reps": r.reps,
                    "note": r.note,
                    "tflops": _num(r.tflops, ".5f"),
                    "gflops": _num(r.gflops, ".6g"),
                    "peak_gflops": _num(r.peak_gflops, ".2f"),
                    "peak_source": r.peak_text,
                    "share_of_peak": _num(r.share, ".4g"),  # significant digits: a small share keeps its precision
                    "peak_mib": _num(None if r.peak_bytes is None else r.peak_bytes / MIB, ".2f"),
                    "floor_mib": _num(r.case.floor_bytes / MIB if r.case.floor_bytes else None, ".2f"),
                    "baseline": baseline_of(r.case, baseline) or "",
                    "time_vs_base": _num(tr, ".4f"),
                    "mem_vs_base": _num(mr, ".4f"),
                    "status": r.status,
                }
            )
    return path
