"""Command line of the benches: options and their defaults, and ``bench_main``/``run_and_report``,
which run one bench module, print its table and write its CSV, plot and run description.

The default run is bounded: each case gets ``--budget`` seconds (see :mod:`bench.runner`), the
cases are the models' sizes without the sweeps. ``--full`` is the long run: every size of each
sweep, a fixed ``--reps`` (10) after ``--warmup`` (2) calls, a 3000 s timeout per process.
``--reps N`` alone keeps the default cases with a fixed number of rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import List, Optional, Sequence

from bench.plots import plot
from bench.runner import MIN_REPS, Progress, _module_name, run_bench, run_cases
from bench.spec import MIB, Result
from bench.tables import environment, print_table, write_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
DEFAULT_BUDGET = 20.0  # seconds per case in the default run
QUICK_BUDGET = 3.0


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def parse_mem(text: str) -> int:
    """'8G', '512M', '2048' (MiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"--max-mem must look like 8G, 512M or 2048 (MiB), got {text!r}")
    mult = {"": MIB, "k": 1024, "m": MIB, "g": 1024 * MIB, "t": 1024**2 * MIB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def make_parser(prog: str = "bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--quick", action="store_true", help="small shapes (seconds, for smoke tests)")
    p.add_argument(
        "--full",
        action="store_true",
        help="the long run: every size of each sweep, fixed --reps/--warmup (10/2), no budget",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds per case; rounds are chosen from the measured duration of one call "
        f"(default {DEFAULT_BUDGET:.0f}, quick {QUICK_BUDGET:.0f}; ignored with --reps or --full)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--reps", type=int, default=None, help="a fixed number of timed rounds (default: from --budget; --full 10)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1, --full 2)")
    p.add_argument(
        "--max-mem", default=None, help="memory cap per measuring process, e.g. 8G (default: half the available memory)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per measuring process before it is killed (default 900, --full 3000)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the measuring processes")
    p.add_argument("--providers", nargs="*", default=None, help="only these providers")
    p.add_argument("--cases", nargs="*", default=None, help="only cases whose name contains one of these")
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes (time only)")
    p.add_argument("--no-peak", action="store_true", help="do not measure the matmul peak")
    p.add_argument("--out", default=RESULTS_DIR, help="output directory (default bench/results)")
    p.add_argument("--no-plot", action="store_true")
    return p


def finish_args(args) -> argparse.Namespace:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full:
        args.reps = 10 if args.reps is None else args.reps
        args.warmup = 2 if args.warmup is None else args.warmup
        args.budget = None
        args.timeout = 3000.0 if args.timeout is None else args.timeout
    else:
        if args.reps is not None:
            args.budget = None  # a fixed number of rounds asked for
        elif args.budget is None:
            args.budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
        if args.warmup is None:
            args.warmup = 1
        if args.timeout is None:
            args.timeout = 900.0
    if args.budget is not None and args.budget <= 0:
        raise SystemExit(f"--budget must be positive seconds, got {args.budget}")
    if args.max_mem is None:
        avail = _mem_available()
        args.max_mem = avail // 2 if avail else 0
    elif not isinstance(args.max_mem, int):
        args.max_mem = parse_mem(args.max_mem)
    # The parent's resident-set check counts the interpreter and torch too (RLIMIT_AS in the
    # child counts from the baseline), so it allows this much on top of the cap.
    args.rss_slack = getattr(args, "rss_slack", 1024 * MIB)
    return args


def describe_timing(args) -> str:
    if args.budget is None:
        return f"timing: {args.warmup} warm-up call(s), then {args.reps} interleaved rounds per case"
    return (
        f"timing: budget {args.budget:.0f} s per case: {args.warmup} warm-up call(s), then as many interleaved "
        f"rounds as fit (at least {MIN_REPS}); cases whose calls do not fit, and heavy ones, are measured "
        f"once per provider"
    )


def check_cases(parser: argparse.ArgumentParser, mods, args) -> None:
    """``--cases`` patterns that select no case of any of ``mods`` (bench modules) end the command
    with a usage error that lists the case names of this run (they depend on ``--quick``/``--full``),
    before anything is measured."""
    if not args.cases:
        return
    names = [c.name for mod in mods for c in run_cases(mod, args)]
    missing = [s for s in args.cases if not any(s in n for n in names)]
    if missing:
        parser.error(
            f"--cases {' '.join(missing)}: no case of this run matches (a case name, or part of one); "
            f"the cases are: {', '.join(names)}"
        )


def bench_main(mod, argv: Optional[Sequence[str]] = None) -> List[Result]:
    """Command line of one bench script: measure, print, write CSV and PNG."""
    parser = make_parser(f"python -m {_module_name(mod)}")
    args = finish_args(parser.parse_args(argv))
    check_cases(parser, [mod], args)
    print(describe_timing(args), flush=True)
    return run_and_report(mod, args)


def results_stem(out_dir: str, name: str, quick: bool) -> str:
    return os.path.join(out_dir, name + ("-quick" if quick else ""))


def run_and_report(mod, args, progress: Optional[Progress] = None) -> List[Result]:
    """Runs a bench (see :func:`bench.runner.run_bench`), prints its table, writes CSV, PNG and a
    JSON description of the run (command, budget, load, wall time) beside them. An optional
    ``describe(device) -> str`` of the bench module is printed first (e.g. the chosen backend)."""
    if hasattr(mod, "describe"):
        print(mod.describe(args.device), flush=True)
    t0, load0 = time.time(), os.getloadavg()
    results = run_bench(mod, args, progress)
    if not results:
        print(f"[{mod.NAME}] no case selected")
        return results
    formula = getattr(mod, "FLOPS", "")
    print_table(mod.NAME, results, getattr(mod, "BASELINE", None), formula)
    stem = results_stem(args.out, mod.NAME, args.quick)
    env = environment(args.device, getattr(args, "threads", None))
    csv_path = write_csv(stem + ".csv", mod.NAME, results, env, getattr(mod, "BASELINE", None))
    print(f"[{mod.NAME}] wrote {csv_path}")
    meta = dict(
        env,
        bench=mod.NAME,
        module=_module_name(mod),
        argv=sys.argv[1:],
        budget=args.budget,
        full=bool(getattr(args, "full", False)),
        quick=bool(args.quick),
        reps=args.reps,
        warmup=args.warmup,
        wall_s=round(time.time() - t0, 1),
        loadavg_start=" ".join(f"{x:.2f}" for x in load0),
        flops_formula=formula,
        peak_gflops=next((r.peak_gflops for r in results if r.peak_gflops), None),
        cores=os.cpu_count(),
    )
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    if not args.no_plot:
        png = plot(stem + ".png", mod.NAME, results, getattr(mod, "X_LABEL", "case.x"))
        if png:
            print(f"[{mod.NAME}] wrote {png}")
    return results
