"""The register-blocked CPU kernels of neighborhood attention (csrc/na2d_cpu_simd.cpp) at the
shapes where their bookkeeping changes: row widths around the vector width (8 or 16 fp32, 4 or 8 fp64
lanes, a partial last block), clamp windows whose lanes' offsets differ (the union is computed and
masked), kernel sizes whose offsets span several register chunks (up to 2k-1 = 25), head dims off
the register blocks (1, 3, 13), odd row counts (query rows go in pairs), dilation, and forward
row bands split over threads. fp64 against the reference to 1e-9 (output and every gradient),
fp32 at the suite's tolerance, and results independent of the thread count bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import dcal.ops as ops
from dcal import _ext
from dcal.ops import reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")

# (border, kernel_size, dilation, X, Y, D)
CASES = [
    ("clamp", 13, 1, 15, 17, 3),  # offsets -12..12 at the borders: four chunks of logits
    ("clamp", 11, 1, 11, 23, 13),  # map exactly the window's height
    ("zero", 11, 1, 7, 9, 1),  # window larger than the map, head dim 1
    ("mask", 13, 1, 5, 16, 13),
    ("zero", 3, 1, 3, 7, 8),  # one partial lane block
    ("mask", 5, 1, 5, 8, 9),  # exactly one fp32 block
    ("clamp", 5, 1, 9, 9, 16),  # one full block and a one-lane tail
    ("clamp", 7, 2, 17, 31, 5),  # dilated sub-grids of unequal size
    ("mask", 3, 3, 10, 19, 12),
    ("zero", 5, 2, 13, 12, 7),
    # centred windows of 7 offsets (the shifted-vector path of the 64-byte kernels): two full lane
    # blocks and a partial one, head dims off the register blocks
    ("zero", 7, 1, 9, 37, 21),
    ("mask", 7, 1, 8, 33, 6),
]


def _inputs(X, Y, D, ks, dtype, B=2, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v, rpb))


def _run(fn, q, k, v, rpb, ks, border, dil):
    out = fn(q, k, v, kernel_size=ks, border=border, rpb=rpb, dilation=dil)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v, rpb), dout))


@pytest.mark.parametrize(
    "dtype,atol,rtol", [(torch.float64, 1e-9, 1e-9), (torch.float32, 2e-5, 1e-4)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-k{c[1]}-d{c[2]}-{c[3]}x{c[4]}-D{c[5]}" for c in CASES])
def test_matches_reference(case, dtype, atol, rtol):
    border, ks, dil, X, Y, D = case
    q, k, v, rpb = _inputs(X, Y, D, ks, dtype)
    ours = _run(lambda *a, **kw: ops.neighborhood_attention2d(*a, backend="cpp", **kw), q, k, v, rpb, ks, border, dil)
    qr, kr, vr, rr = (t.detach().double().requires_grad_() for t in (q, k, v, rpb))
    ref = _run(reference.neighborhood_attention2d, qr, kr, vr, rr, ks, border, dil)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_thread_count_does_not_change_a_bit():
    # 2 x 3 slices of 70 rows: the forward splits rows into bands over the threads
    q, k, v, rpb = _inputs(70, 21, 6, 7, torch.float32, B=2, H=3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(
                _run(
                    lambda *a, **kw: ops.neighborhood_attention2d(*a, backend="cpp", **kw), q, k, v, rpb, 7, "clamp", 1
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("border", ["zero", "clamp", "mask"])
@pytest.mark.parametrize("where", ["q", "k", "v", "dout", "v-inf"])
def test_nonfinite_input_reaches_only_its_windows(border, where):
    """A NaN (or an inf in v) in one input element: the kernels find it while staging and the call
    runs the per-window kernels, so NaN reaches exactly the outputs and gradients it reaches in the
    reference, and every other value matches it."""
    X, Y, D, ks = 9, 19, 5, 5
    g = torch.Generator().manual_seed(3)
    t = {n: torch.randn(1, 2, X, Y, D, generator=g, dtype=torch.float64) for n in ("q", "k", "v", "dout")}
    rpb = torch.randn(2, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64)
    name, bad = (where, float("nan")) if where != "v-inf" else ("v", float("inf"))
    t[name][0, 1, 4, 2, 3] = bad

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (t["q"], t["k"], t["v"], rpb)]
        out = fn(*leaves[:3], kernel_size=ks, border=border, rpb=leaves[3])
        return (out, *torch.autograd.grad(out, leaves, t["dout"]))

    ours = run(lambda *a, **kw: ops.neighborhood_attention2d(*a, backend="cpp", **kw))
    ref = run(reference.neighborhood_attention2d)
    assert ours[0].isnan().any() or ours[1].isnan().any()  # the bad value did reach something
    for n, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref):
        assert torch.equal(a.isnan(), b.isnan()), f"{n}: NaN in {a.isnan().sum()} places, reference {b.isnan().sum()}"
        fin = b.isfinite()
        torch.testing.assert_close(a[fin], b[fin], atol=1e-9, rtol=1e-9, msg=lambda m: f"{n}: {m}")


_WIDTH_SCRIPT = """
import sys, torch
import dcal.ops as ops
g = torch.Generator().manual_seed(5)
res = []
for border, ks, dil, X, Y, D in [("clamp", 7, 1, 11, 37, 20), ("zero", 5, 2, 13, 33, 16), ("mask", 3, 1, 6, 17, 8),
                                 ("zero", 7, 1, 7, 35, 12)]:
    for dtype in (torch.float32, torch.float64):
        q, k, v, do = (torch.randn(2, 2, X, Y, D, generator=g, dtype=dtype) for _ in range(4))
        rpb = torch.randn(2, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=dtype)
        leaves = [x.requires_grad_() for x in (q, k, v, rpb)]
        out = ops.neighborhood_attention2d(*leaves[:3], kernel_size=ks, border=border, rpb=leaves[3], dilation=dil,
                                           backend="cpp")
        res.append([out.detach(), *torch.autograd.grad(out, leaves, do)])
torch.save(res, sys.argv[1])
"""


def test_vector_widths_give_the_same_bits(tmp_path):
    """The 64-byte kernels (AVX-512 CPUs) and the 32-byte ones (DCAL_CPU_VECTOR_BITS=256) run the
    same operations per lane in the same order: out, dq, dk and dv are the same bits; the bias
    gradient sums the lanes of its accumulators in another grouping (same values to rounding)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "widths.py"
    script.write_text(_WIDTH_SCRIPT)
    got = {}
    for bits in ("256", "default"):
        env = dict(os.environ)
        env.pop("DCAL_CPU_VECTOR_BITS", None)
        if bits == "256":
            env["DCAL_CPU_VECTOR_BITS"] = "256"
        path = tmp_path / f"{bits}.pt"
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=300)
        got[bits] = torch.load(path)
    for case_a, case_b in zip(got["256"], got["default"]):
        for n, a, b in zip(("out", "dq", "dk", "dv"), case_a, case_b):
            assert torch.equal(a, b), f"{n}: max difference {(a - b).abs().max().item():.3e}"
        tol = 1e-12 if case_a[4].dtype == torch.float64 else 1e-5
        torch.testing.assert_close(case_a[4], case_b[4], atol=tol, rtol=tol)
