"""Share of the GEMM peak of the CPU neighborhood kernels, measured against a large torch.mm
in the same process, interleaved (op, mm, op, mm, ...), medians.

``python -m bench.na_peak [--reps N] [--shapes small,large] [--modes fwd,fwd+bwd] [--dtype float32]``

The two shapes are the neighborhood bench's: B1 H4 C128 128x128 and B2 H4 C256 256x256 (kernel 7,
border zero, channels-first maps viewed as [B, H, X, Y, D]). FLOPs: 4 * B * H * X * Y * 49 * D
per forward, 2.5x that for the backward (bench.common.flops_neighborhood). The peak is
torch.mm of two 3072 x 3072 fp32 matrices (2 * 3072^3 FLOP). Ratios against the same-process
GEMM are far steadier than absolute times on a shared machine; the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.neighborhood import dcal_na

SHAPES = {"small": (1, 4, 128, 128), "large": (2, 4, 256, 256)}
KS = 7


CLOCK = time.perf_counter


def _time(fn):
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="small,large")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--border", default="zero")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (with --threads 1: steadier than wall time on a busy machine)",
    )
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n = 3072
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm_flops = 2 * n**3
    for name in args.shapes.split(","):
        B, H, C, M = SHAPES[name]
        D = C // H
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(B, C, M, M, generator=g).to(dtype) for _ in range(4))
        for mode in args.modes.split(","):
            flops = 4 * B * H * M * M * KS * KS * D * (1 if mode == "fwd" else 3.5)
            if mode == "fwd":

                def op():
                    with torch.no_grad():
                        dcal_na(q, k, v, H, KS, args.border)
            else:
                qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

                def op():
                    out = dcal_na(qq, kk, vv, H, KS, args.border)
                    torch.autograd.grad(out, (qq, kk, vv), dout)

            op()
            torch.mm(a, b)
            t_op, t_mm = [], []
            for _ in range(args.reps):
                t_op.append(_time(op))
                t_mm.append(_time(lambda: torch.mm(a, b)))
            mo, mm = statistics.median(t_op), statistics.median(t_mm)
            peak = mm_flops / mm
            got = flops / mo
            print(
                f"B{B} C{C} {M}x{M} D{D} {mode:8s} {args.dtype}: {mo * 1e3:9.2f} ms  {got / 1e9:6.1f} GFLOP/s"
                f"  peak(mm) {peak / 1e9:6.1f}  share {got / peak:6.1%}  load {os.getloadavg()[0]:.2f}"
                f"  threads {torch.get_num_threads()}{'  (cpu time)' if args.cpu_time else ''}",
                flush=True,
            )


if __name__ == "__main__":
    main()
