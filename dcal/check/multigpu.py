"""The second-GPU check of ``python -m dcal.check --device cuda``: every Triton op on ``cuda:1``
while ``cuda:0`` is the current device.

Triton launches on the current device; the launchers switch to the tensors' device first
(``dcal/kernels/_device.py``). Without that, these cases read cuda:1 memory from a kernel running
on cuda:0: an illegal address, or wrong values. Each case runs the op forward and backward on
cuda:1 (float16), compares with the reference backend on the same tensors in float32, and checks
that the outputs live on cuda:1, that cuda:0 is still current, and that cuda:1 synchronises
cleanly. With fewer than two GPUs every case is reported as skipped, with the reason.

``python -m dcal.check.multigpu --out rows.jsonl`` (run by the driver in a subprocess) writes one
JSON row per case, in the rows format of :mod:`dcal.check.worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

CASES = ("pwca_attention", "neighborhood_attention2d", "attention_rollout")
SHAPES = {
    "pwca_attention": "B2 H3 Nq37 Nk37+29 D64",
    "neighborhood_attention2d": "B2 H2 13x17 D32 k7 clamp rpb",
    "attention_rollout": "L3 B2 H3 N37 D64",
}
TOL = 3e-2  # float16 kernels against the float32 reference, relative to the reference's largest magnitude


def _row(op: str, status: str, max_err=None, seconds=None, detail: str = "") -> Dict:
    return dict(
        op=op,
        backend="triton",
        device="cuda:1",
        dtype="float16",
        shape=SHAPES[op],
        check="cuda:1",
        status=status,
        max_err=max_err,
        tol=TOL if max_err is not None else None,
        seconds=seconds,
        detail=detail,
        id=f"{op}|triton|float16|{SHAPES[op]}|cuda:1",
    )


def _inputs(op: str, dev, dtype):
    import torch

    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    if op == "pwca_attention":
        return [rnd(2, 3, 37, 64), rnd(2, 3, 37, 64), rnd(2, 3, 37, 64), rnd(2, 3, 29, 64), rnd(2, 3, 29, 64)], {}
    if op == "neighborhood_attention2d":
        rpb = rnd(2, 13, 13)
        return [rnd(2, 2, 13, 17, 32) for _ in range(3)], dict(kernel_size=7, border="clamp", rpb=rpb)
    return [[rnd(2, 3, 37, 64) for _ in range(3)], [rnd(2, 3, 37, 64) for _ in range(3)]], {}


def _err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def run_case(op: str, device: str = "cuda:1") -> Dict:
    """One case on ``device`` with cuda:0 current. ``device="cpu"`` runs the same comparison under
    the Triton interpreter (float32), for testing this check where there is no GPU."""
    import torch

    from dcal import ops

    fn = getattr(ops, op)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    args, kw = _inputs(op, dev, torch.float16 if cuda else torch.float32)
    if cuda:
        torch.cuda.set_device(0)
    errs = []
    if op == "attention_rollout":
        got = fn(*args, backend="triton")
        want = fn([t.float() for t in args[0]], [t.float() for t in args[1]], backend="reference")
        outs = [(got, want)]
    else:
        leaves = [t.detach().requires_grad_() for t in args]
        ref_leaves = [t.detach().float().requires_grad_() for t in args]
        kw_ref = {k: (v.float() if hasattr(v, "float") else v) for k, v in kw.items()}
        got = fn(*leaves, backend="triton", **kw)
        want = fn(*ref_leaves, backend="reference", **kw_ref)
        dout = torch.randn(got.shape, generator=torch.Generator(device=dev).manual_seed(1), device=dev)
        grads = torch.autograd.grad(got, leaves, dout.to(got.dtype))
        grads_ref = torch.autograd.grad(want, ref_leaves, dout)
        outs = [(got, want)] + list(zip(grads, grads_ref))
    if cuda:
        torch.cuda.synchronize(dev)
    if cuda and torch.cuda.current_device() != 0:
        return _row(
            op,
            "fail",
            seconds=time.perf_counter() - t0,
            detail=f"the op left cuda:{torch.cuda.current_device()} current; cuda:0 was",
        )
    wrong = [str(a.device) for a, _ in outs if a.device != dev]
    if wrong:
        return _row(op, "fail", seconds=time.perf_counter() - t0, detail=f"outputs on {wrong}, inputs on {dev}")
    errs = [_err(a, b) for a, b in outs]
    worst = max(errs)
    return _row(
        op,
        "pass" if worst <= TOL else "fail",
        max_err=worst,
        seconds=time.perf_counter() - t0,
        detail="forward" + (" and gradients" if len(outs) > 1 else "") + " on cuda:1 with cuda:0 current",
    )


def rows() -> List[Dict]:
    """One row per case: run on cuda:1, or skipped with the reason."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        why = f"needs a second GPU (cuda:1); {n} visible" + (
            " (CUDA_VISIBLE_DEVICES)" if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else ""
        )
        return [_row(op, "skip", detail=why) for op in CASES]
    out = []
    for op in CASES:
        try:
            out.append(run_case(op))
        except Exception as e:  # a crash of one case is its result
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            out.append(_row(op, "error", detail=f"{type(e).__name__}: {first}"))
    return out


def run_from_driver(a, env, workdir: str, deadline: float) -> List[Dict]:
    """The driver's part (``--device cuda`` only): this module in a subprocess; its rows, or an
    error row per case it did not report (crash, timeout), with the end of its log."""
    import subprocess

    out, log = os.path.join(workdir, "cuda1.jsonl"), os.path.join(workdir, "cuda1.log")
    if os.path.exists(out):
        os.remove(out)
    with open(log, "a") as f:
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "dcal.check.multigpu", "--out", out],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, min(600.0, deadline - time.time())),
            ).returncode
            what = f"exited with status {rc}"
        except subprocess.TimeoutExpired:
            rc, what = None, "timed out"
    got = []
    if os.path.exists(out):
        for line in open(out, errors="replace"):
            try:
                got.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                pass
    if rc == 0 and got:
        return got
    lines = open(log, errors="replace").read().strip().splitlines() if os.path.exists(log) else []
    tail = " | ".join(lines[-6:])[-600:]
    done = {r["op"] for r in got}
    return got + [_row(op, "error", detail=f"cuda:1 check {what}: {tail}") for op in CASES if op not in done]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.check.multigpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="rows as JSON lines")
    a = p.parse_args(argv)
    with open(a.out, "w") as f:
        for r in rows():
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
