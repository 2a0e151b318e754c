"""``python -m bench [--quick] [names...]``: the project's speed/memory comparisons.

Runs each named bench (default: all of :data:`BENCHES`, in that order) through
:mod:`bench.common`: a table per bench on stdout, ``bench/results/<name>[-quick].csv`` and
``.png``. Every option of a single bench applies (``--device``, ``--reps``, ``--max-mem``,
``--providers``, ``--cases``, ...); ``python -m bench.<name>`` runs one bench alone.
A bench whose script is not there (or fails to import) is skipped with a message.
"""
from __future__ import annotations

import importlib
import sys
import time

from bench.common import finish_args, make_parser, run_and_report

BENCHES = ("pwca", "neighborhood", "rollout", "train_step")


def main(argv=None) -> int:
    parser = make_parser("python -m bench")
    parser.add_argument("names", nargs="*",
                        help=f"benches to run, before the options (default: {' '.join(BENCHES)})")
    args = finish_args(parser.parse_args(argv))
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; expected some of: {', '.join(BENCHES)}")
    ran, skipped = [], []
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                msg = f"bench/{name}.py does not exist (yet)"
            else:
                msg = f"bench/{name}.py cannot be imported: {e}"
            print(f"[{name}] skipped: {msg}", flush=True)
            skipped.append(name)
            continue
        except Exception as e:  # a broken script must not stop the others
            print(f"[{name}] skipped: bench/{name}.py failed to import: {type(e).__name__}: {e}", flush=True)
            skipped.append(name)
            continue
        t0 = time.time()
        try:
            run_and_report(mod, args)
        except Exception as e:  # one broken bench must not stop the others
            print(f"[{name}] failed: {type(e).__name__}: {e}", flush=True)
            skipped.append(name)
            continue
        print(f"[{name}] done in {time.time() - t0:.0f} s\n", flush=True)
        ran.append(name)
    print(f"benches run: {', '.join(ran) or 'none'}; skipped: {', '.join(skipped) or 'none'}")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
