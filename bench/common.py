"""Public names of the bench machinery, re-exported from the modules that hold them (import from here).

A bench script is a module of plain functions; the runner measures it, the tables and plots show it:

* :mod:`bench.spec`: what a script declares: :class:`Case`, :class:`Unavailable`, :class:`Result`,
  FLOP formulas (:func:`flops_attention`, :func:`flops_neighborhood`, :func:`flops_rollout`) and
  memory floors (:func:`nbytes`, :func:`floor_outputs`);
* :mod:`bench.measure`: the measuring process (peak memory, interleaved rounds, matmul peak);
* :mod:`bench.runner`: processes, OOM/timeouts, the per-case time budget, progress (:func:`run_bench`);
* :mod:`bench.tables`: printed tables and CSV (:func:`print_table`, :func:`write_csv`, :func:`environment`);
* :mod:`bench.plots`: PNG plots (:func:`plot`);
* :mod:`bench.cli`: options and entry points (:func:`bench_main`, :func:`run_and_report`).

Writing a bench script (``bench/<name>.py``)::

    import sys
    from bench.common import Case, Unavailable, bench_main, flops_attention, floor_outputs

    NAME = "pwca"                          # results go to bench/results/pwca.{csv,png,json}
    BASELINE = "sdpa_cat"                  # optional: ratio columns are relative to it
    X_LABEL = "tokens"                     # optional: x axis of the plot
    FLOPS = "4*Nq*Nk*D per head forward"   # optional: the FLOP formula, printed with the table

    def cases(quick: bool, device: str, full: bool = False) -> list[Case]:
        # one Case per measured point; params must be JSON-serialisable. ``full`` (optional
        # argument): the long run's sweep; the default run keeps to sizes that fit its budget.
        return [Case(name="N785-fwd", params=dict(B=2, H=12, N=785, D=64), dtype="float32",
                     device=device, mode="fwd", flops=flops_attention(2, 12, 785, 1570, 64),
                     floor_bytes=floor_outputs((2, 12, 785, 64), "float32", "fwd"), x=785, group="fwd")]

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

Output: a printed table per bench; ``bench/results/<name>[-quick].csv`` with one row per (case,
provider) (see :data:`CSV_FIELDS`), ``.png`` and ``.json`` (how the run was made). A case marked
``heavy`` (tens of seconds per call) is measured once per provider in the default run.
"""

from __future__ import annotations

import sys

from bench.cli import (
    DEFAULT_BUDGET,
    QUICK_BUDGET,
    RESULTS_DIR,
    bench_main,
    check_cases,
    describe_timing,
    finish_args,
    make_parser,
    parse_mem,
    results_stem,
    run_and_report,
)
from bench.measure import matmul_gflops, time_fn
from bench.plots import plot, provider_colour
from bench.runner import MAX_REPS, MIN_REPS, ROOT, Progress, matmul_peak, plan_timing, run_bench, select_cases
from bench.spec import (
    MIB,
    Case,
    Result,
    Unavailable,
    floor_outputs,
    flops_attention,
    flops_neighborhood,
    flops_rollout,
    nbytes,
)
from bench.tables import CSV_FIELDS, cpu_model, environment, git_commit, print_table, time_ratio, write_csv

__all__ = [
    "CSV_FIELDS",
    "Case",
    "DEFAULT_BUDGET",
    "MAX_REPS",
    "MIB",
    "MIN_REPS",
    "Progress",
    "QUICK_BUDGET",
    "RESULTS_DIR",
    "ROOT",
    "Result",
    "Unavailable",
    "bench_main",
    "check_cases",
    "cpu_model",
    "describe_timing",
    "environment",
    "finish_args",
    "floor_outputs",
    "flops_attention",
    "flops_neighborhood",
    "flops_rollout",
    "git_commit",
    "make_parser",
    "matmul_gflops",
    "matmul_peak",
    "nbytes",
    "parse_mem",
    "plan_timing",
    "plot",
    "print_table",
    "provider_colour",
    "results_stem",
    "run_and_report",
    "run_bench",
    "select_cases",
    "time_fn",
    "time_ratio",
    "write_csv",
]

if __name__ == "__main__":
    sys.exit("bench/common.py is a library; run `python -m bench [--quick] [names...]`")
