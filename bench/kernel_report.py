"""Static GPU kernel report: compile every registered Triton kernel configuration ahead of time
for sm_80 and sm_90 (no GPU needed) and the CUDA C++ kernels with ``nvcc -Xptxas -v``, and print
registers, spill bytes and shared memory per configuration. Spills are defects.

    python -m bench.kernel_report [--arch 80 90] [--filter pwca] [--csv PATH] [--no-cuda-cpp]
    python -m bench.kernel_report --roofline [--dtype float16 bfloat16]   (see bench/roofline.py)
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time


def _fmt_label(label: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in label.items())


def triton_rows(archs, name_filter=None):
    from dcal.testing.aot import compile_all

    return compile_all(archs=tuple(archs), name_filter=name_filter)


def cuda_cpp_rows(archs):
    try:
        from bench import cuda_report
    except ImportError as e:
        print(f"(CUDA C++ kernels: bench/cuda_report.py unavailable: {e})")
        return []
    return cuda_report.rows(archs=tuple(archs))


def print_table(rows, out=sys.stdout):
    head = f"{'kernel':<24} {'arch':<6} {'config':<58} {'warps':>5} {'regs':>5} {'spill B':>7} {'smem B':>7}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(
            f"{r['name']:<24} {r['arch']:<6} {_fmt_label(r.get('label', {})):<58} {r.get('num_warps', ''):>5} "
            f"{r['regs']:>5} {r['spill_bytes']:>7} {r['shared']:>7}",
            file=out,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default=None, help="only kernels whose name contains this")
    p.add_argument("--csv", default=os.path.join("bench", "results", "kernel_report.csv"))
    p.add_argument("--no-cuda-cpp", action="store_true", help="skip the CUDA C++ kernels")
    p.add_argument(
        "--roofline",
        action="store_true",
        help="instead: FLOPs, bytes, arithmetic intensity and occupancy of the Triton PWCA and "
        "neighborhood kernels at the DCAL and BEV sizes on an H100",
    )
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], help="dtypes of --roofline")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        os.environ.pop("TRITON_INTERPRET")  # must be off before triton kernels are imported
    if a.roofline:
        from bench import roofline

        text = roofline.report(tuple(a.dtype))
        print(text)
        return text
    t0 = time.time()
    rows = triton_rows(a.arch, a.filter)
    if not a.no_cuda_cpp:
        rows += cuda_cpp_rows(a.arch)
    print_table(rows)
    spills = [r for r in rows if r["spill_bytes"]]
    print(
        f"\n{len(rows)} kernel configurations compiled in {time.time() - t0:.0f} s; "
        f"{len(spills)} with spills"
        + (
            ": " + ", ".join(f"{r['name']}[{r['arch']} {_fmt_label(r.get('label', {}))}]" for r in spills)
            if spills
            else ""
        )
    )
    if a.csv:
        os.makedirs(os.path.dirname(a.csv) or ".", exist_ok=True)
        keys = [
            "name",
            "arch",
            "config",
            "num_warps",
            "num_stages",
            "regs",
            "spill_bytes",
            "stack",
            "shared",
            "cubin_bytes",
        ]
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "config": _fmt_label(r.get("label", {}))})
        print(f"written {a.csv}")
    return rows


if __name__ == "__main__":
    main()
