"""``python -m bench [--quick | --full] [--budget S] [names...]``: the project's speed/memory comparisons.

Runs each named bench (default: all of :data:`BENCHES`, in that order) through
:mod:`bench.common`: a table per bench on stdout, ``bench/results/<name>[-quick].{csv,png,json}``.
The default run is bounded (``--budget`` seconds per case, the models' sizes; see
:mod:`bench.runner`) and prints a progress line per case with the elapsed time and an estimate
of what is left; ``--full`` is the long run. Every option of a single bench applies
(``--device``, ``--reps``, ``--max-mem``, ``--providers``, ``--cases``, ...);
``python -m bench.<name>`` runs one bench alone, ``python -m bench.report`` turns the CSVs into
the results table of docs/results.md. A bench whose script is not there (or fails to import) is skipped
with a message.
"""

from __future__ import annotations

import importlib
import sys
import time

from bench.common import Progress, check_cases, describe_timing, finish_args, make_parser, run_and_report, select_cases

BENCHES = ("pwca", "neighborhood", "rollout", "train_step")


def _load(name):
    try:
        return importlib.import_module(f"bench.{name}"), None
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return None, f"bench/{name}.py does not exist (yet)"
        return None, f"bench/{name}.py cannot be imported: {e}"
    except Exception as e:  # a broken script must not stop the others
        return None, f"bench/{name}.py failed to import: {type(e).__name__}: {e}"


def main(argv=None) -> int:
    parser = make_parser("python -m bench")
    parser.add_argument("names", nargs="*", help=f"benches to run, before the options (default: {' '.join(BENCHES)})")
    args = finish_args(parser.parse_args(argv))
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; expected some of: {', '.join(BENCHES)}")
    t_all = time.time()
    ran, skipped, mods = [], [], []
    for name in names:
        mod, why = _load(name)
        if mod is None:
            print(f"[{name}] skipped: {why}", flush=True)
            skipped.append(name)
        else:
            mods.append((name, mod))
    check_cases(parser, [mod for _, mod in mods], args)
    total = 0
    for name, mod in mods:
        try:
            total += len(select_cases(mod, args))
        except Exception as e:
            print(f"[{name}] cannot list its cases: {type(e).__name__}: {e}", flush=True)
    print(f"{total} cases in {len(mods)} benches; {describe_timing(args)}", flush=True)
    progress = Progress(total)
    for name, mod in mods:
        t0 = time.time()
        try:
            run_and_report(mod, args, progress)
        except Exception as e:  # one broken bench must not stop the others
            print(f"[{name}] failed: {type(e).__name__}: {e}", flush=True)
            skipped.append(name)
            continue
        print(f"[{name}] done in {time.time() - t0:.0f} s\n", flush=True)
        ran.append(name)
    wall = time.time() - t_all
    print(
        f"benches run: {', '.join(ran) or 'none'}; skipped: {', '.join(skipped) or 'none'}; "
        f"wall time {int(wall) // 60} min {int(wall) % 60} s"
    )
    if ran and not args.quick:
        print(
            "python -m bench.report writes the results table (docs/results.md) and bench/results/summary.md from these CSVs"
        )
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
