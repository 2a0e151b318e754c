"""bf16 neighborhood attention on the CPU SIMD kernels (csrc/na2d_cpu_simd.cpp).

bf16 tensors run the fp32 kernels: rows are widened as they are staged, outputs rounded to nearest
even as they are written, every operation in between is the fp32 kernels' own. So a bf16 call gives
exactly (bit for bit) the fp32 call on the inputs converted to fp32, rounded with torch's
``.to(torch.bfloat16)``: out, lse (fp32 in both), dq, dk, dv and drpb, at every border, dilation,
kernel size and layout. That equality also shows the routing: the per-window kernels (the private
op ``dcal::_na2d_fwd_window``, what bf16 ran on before) compute the logsumexp in another order, so
their lse differs from the SIMD kernels' in its last bits. Against the fp64 reference both paths
meet the suite's tolerance rule (dcal.testing.judging). Non-finite inputs still go to the
per-window kernels; special values (denormals, negative zero, NaN and inf from overflow) are
rounded exactly as torch rounds them; results do not depend on the thread count.
"""

from __future__ import annotations

import pytest
import torch

import dcal.ops as ops
from dcal import _ext
from dcal.ops import reference
from dcal.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")

BORDER = {"zero": 0, "mask": 1, "clamp": 2}
NAMES = ("dq", "dk", "dv", "drpb")

# (border, kernel_size, dilation, X, Y, D, layout)
CASES = [
    ("zero", 3, 1, 9, 21, 16, "last"),
    ("zero", 7, 2, 17, 37, 20, "first"),
    ("mask", 5, 1, 11, 19, 8, "first"),
    ("mask", 7, 1, 9, 33, 32, "last"),
    ("clamp", 3, 2, 10, 23, 12, "last"),
    ("clamp", 5, 1, 7, 17, 16, "first"),
    ("clamp", 7, 1, 13, 40, 24, "last"),
    ("zero", 5, 2, 14, 18, 5, "last"),  # head dim off the vector width: the scalar tails
    ("clamp", 13, 1, 15, 17, 3, "first"),  # offsets -12..12 at the borders, head dim 3
    ("zero", 11, 1, 7, 9, 1, "last"),  # window larger than the map, head dim 1
    ("mask", 3, 3, 10, 19, 13, "first"),  # dilation 3
    ("clamp", 5, 2, 12, 21, 16, "qkv"),  # strided token-major views
]
IDS = [f"{c[0]}-k{c[1]}-d{c[2]}-{c[3]}x{c[4]}-D{c[5]}-{c[6]}" for c in CASES]


def _map(B, H, X, Y, D, layout, g):
    """A bf16 [B, H, X, Y, D] tensor: contiguous ("last"), a channels-first view ("first") or the
    view of one third of a fused qkv projection [B, X, Y, 3, H, D] ("qkv")."""
    if layout == "last":
        return torch.randn(B, H, X, Y, D, generator=g).bfloat16()
    if layout == "qkv":
        return torch.randn(B, X, Y, 3, H, D, generator=g).bfloat16()[:, :, :, 1].permute(0, 3, 1, 2, 4)
    return torch.randn(B, H, D, X, Y, generator=g).bfloat16().permute(0, 1, 3, 4, 2)


def _inputs(case, seed=0, B=1, H=2):
    border, ks, dil, X, Y, D, layout = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (_map(B, H, X, Y, D, layout, g) for _ in range(4))
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g).bfloat16()
    return q, k, v, dout, rpb


def _ops(fwd, bwd, q, k, v, dout, rpb, ks, border, dil, scale=0.3):
    out, lse = fwd(q, k, v, rpb, ks, BORDER[border], scale, dil)
    return (out, lse, *bwd(dout, q, k, v, rpb, out, lse, ks, BORDER[border], scale, dil))


def _simd(*a):
    return _ops(torch.ops.dcal.na2d_fwd, torch.ops.dcal.na2d_bwd, *a)


def _window(*a):
    return _ops(torch.ops.dcal._na2d_fwd_window, torch.ops.dcal._na2d_bwd_window, *a)


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _same_bits(name, a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    same = _bits(a) == _bits(b)
    assert bool(same.all()), f"{name}: {int((~same).sum())} of {a.numel()} elements differ, e.g. {a[~same][:4]}"


def _as_fp32(*ts):
    return [t.float() for t in ts]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_is_the_fp32_kernels_rounded(case):
    border, ks, dil = case[:3]
    q, k, v, dout, rpb = _inputs(case)
    got = _simd(q, k, v, dout, rpb, ks, border, dil)
    f = _simd(*_as_fp32(q, k, v, dout, rpb), ks, border, dil)
    # the backward of the fp32 run from the bf16 run's own (rounded) out, as the bf16 backward sees it
    f = (*f[:2], *torch.ops.dcal.na2d_bwd(*_as_fp32(dout, q, k, v, rpb, got[0]), f[1], ks, BORDER[border], 0.3, dil))
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32] + [torch.bfloat16] * 4
    for name, a, b in zip(("out", "lse", *NAMES), got, f):
        _same_bits(name, a, b.to(a.dtype))

    # outputs and gradients take their inputs' dim order
    def order(t):
        return sorted(range(5), key=lambda i: -t.stride(i))

    for a, like in zip((got[0], got[2], got[3], got[4]), (q, q, k, v)):
        assert order(a) == order(like)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_reaches_the_simd_kernels_not_the_window_path(case):
    """If bf16 fell back to the per-window kernels, its lse would be theirs bit for bit; it is the
    fp32 SIMD kernels' (test above) and differs from theirs, while the outputs stay close."""
    border, ks, dil = case[:3]
    q, k, v, dout, rpb = _inputs(case, seed=1)
    simd = _simd(q, k, v, dout, rpb, ks, border, dil)
    win = _window(q, k, v, dout, rpb, ks, border, dil)
    assert not torch.equal(simd[1], win[1]), "bf16 lse is the per-window kernels' bit for bit"
    torch.testing.assert_close(simd[1], win[1], atol=1e-5, rtol=1e-5)
    # and the SIMD bf16 lse is the fp32 SIMD kernels' on the same values, bit for bit
    f = torch.ops.dcal.na2d_fwd(*_as_fp32(q, k, v, rpb), ks, BORDER[border], 0.3, dil)
    _same_bits("lse", simd[1], f[1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_meets_the_tolerance_rule(case):
    """Both paths against the fp64 reference on the same bf16 inputs, by the suite's rule (the
    reference run in bf16 gives PyTorch's own error at that precision); the SIMD kernels also
    against the per-window kernels taken as the low-precision reference."""
    border, ks, dil = case[:3]
    q, k, v, dout, rpb = _inputs(case, seed=2)

    def public(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, rpb)]
        out = fn(*leaves[:3], kernel_size=ks, border=border, rpb=leaves[3], dilation=dil, scale=0.3)
        return (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))

    simd = public(torch.bfloat16, lambda *a, **kw: ops.neighborhood_attention2d(*a, backend="cpp", **kw))
    raw = _simd(q, k, v, dout, rpb, ks, border, dil)
    for name, a, b in zip(("out", *NAMES), simd, (raw[0], *raw[2:])):
        _same_bits(name, a, b)  # the public op (autograd) runs the same kernels
    win = _window(q, k, v, dout, rpb, ks, border, dil)
    win = (win[0], *win[2:])
    truth = public(torch.float64, reference.neighborhood_attention2d)
    low = public(torch.bfloat16, reference.neighborhood_attention2d)
    for name, a, w, t, lo in zip(("out", *NAMES), simd, win, truth, low):
        assert_close_to_reference(name, a, t, lo)
        assert_close_to_reference(name, w, t, lo)
        assert_close_to_reference(name, a, t, w)


@pytest.mark.parametrize("border", ["zero", "clamp", "mask"])
@pytest.mark.parametrize("where", ["q", "k", "v", "dout", "v-inf"])
def test_nonfinite_bf16_input_is_routed_as_in_fp32(border, where):
    """A NaN (or an inf in v) in one bf16 element, routed as for fp32: the forward's probe covers v
    (a NaN of q or k stays in its own windows' logits, which are selected, never weighed by 0), so
    a bad v sends the forward to the per-window kernels and q, k stay on the SIMD kernels; the
    backward's probe covers every input, so its call runs the per-window kernels. Each result is
    then that path's bit for bit, and NaN is where the fp64 reference has it."""
    case = (border, 5, 1, 9, 19, 8, "last")
    q, k, v, dout, rpb = _inputs(case, seed=3)
    t = {"q": q, "k": k, "v": v, "dout": dout}
    name, bad = (where, float("nan")) if where != "v-inf" else ("v", float("inf"))
    t[name][0, 1, 4, 2, 3] = bad
    args = (t["q"], t["k"], t["v"], rpb, 5, BORDER[border], 0.3, 1)
    out, lse = torch.ops.dcal.na2d_fwd(*args)
    if name == "v":
        expect = torch.ops.dcal._na2d_fwd_window(*args)
    else:
        f = torch.ops.dcal.na2d_fwd(*_as_fp32(*args[:4]), *args[4:])
        expect = (f[0].bfloat16(), f[1])
    _same_bits("out", out, expect[0])
    _same_bits("lse", lse, expect[1])
    bargs = (t["dout"], t["q"], t["k"], t["v"], rpb, out, lse, 5, BORDER[border], 0.3, 1)
    grads = torch.ops.dcal.na2d_bwd(*bargs)
    for n, a, b in zip(NAMES, grads, torch.ops.dcal._na2d_bwd_window(*bargs)):
        _same_bits(n, a, b)
    assert out.isnan().any() or grads[0].isnan().any()
    leaves = [x.double().requires_grad_() for x in (t["q"], t["k"], t["v"], rpb)]
    ref_out = reference.neighborhood_attention2d(*leaves[:3], kernel_size=5, border=border, rpb=leaves[3], scale=0.3)
    ref = (ref_out, *torch.autograd.grad(ref_out, leaves, t["dout"].double()))
    for n, a, b in zip(("out", *NAMES), (out, *grads), ref):
        assert torch.equal(a.isnan(), b.isnan()), (
            f"{n}: NaN in {int(a.isnan().sum())} places, reference {int(b.isnan().sum())}"
        )


def test_special_values_round_as_torch_does():
    """Outputs the kernels compute in fp32 from finite bf16 inputs, rounded by the kernels as
    ``.to(torch.bfloat16)`` rounds them: denormals (kept, not flushed), negative zero (a tiny
    negative value), NaN (logits that overflow) and inf (a gradient that overflows)."""
    B, H, X, Y, D, ks = 1, 2, 8, 37, 16, 3
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(B, H, X, Y, D, generator=g).bfloat16() for _ in range(2))
    # v: 0 or the smallest negative bf16 denormal; outputs are denormal or round to -0
    tiny = torch.tensor(-9.1835e-41).bfloat16()
    v = torch.where(torch.rand(B, H, X, Y, D, generator=g) < 0.4, tiny, torch.zeros((), dtype=torch.bfloat16))
    q[0, 0, 3] *= 1e37  # logits of this row overflow to inf: NaN outputs
    k[0, 0, 3:5] *= 1e5
    out, lse = torch.ops.dcal.na2d_fwd(q, k, v, None, ks, 0, 0.25, 1)
    fo, fl = torch.ops.dcal.na2d_fwd(q.float(), k.float(), v.float(), None, ks, 0, 0.25, 1)
    _same_bits("out", out, fo.to(torch.bfloat16))
    _same_bits("lse", lse, fl)
    bits = out.view(torch.int16)
    assert bool(out.isnan().any()), "no NaN output: the overflow case did not happen"
    assert bool((bits == -0x8000).any()), "no negative zero output"
    assert bool(((bits & 0x7F80) == 0).logical_and((bits & 0x7F) != 0).any()), "no denormal output"
    # inf: dq = scale * dS @ K overflows with q = 0 (uniform P), k = +-K by column parity, v and
    # dS correlated with k's sign; delta stays finite, so the SIMD kernels' result stands
    big = torch.tensor(3e38).bfloat16()
    sign = torch.where(torch.arange(Y) % 2 == 0, 1.0, -1.0).view(1, 1, 1, Y, 1)
    q0 = torch.zeros(B, H, X, Y, D, dtype=torch.bfloat16)
    kk = (sign * big.float()).expand(B, H, X, Y, D).bfloat16().contiguous()
    vv = sign.expand(B, H, X, Y, D).bfloat16().contiguous()
    do = torch.ones(B, H, X, Y, D, dtype=torch.bfloat16)
    o, l = torch.ops.dcal.na2d_fwd(q0, kk, vv, None, ks, 0, 0.25, 1)
    grads = torch.ops.dcal.na2d_bwd(do, q0, kk, vv, None, o, l, ks, 0, 0.25, 1)
    fo, fl = torch.ops.dcal.na2d_fwd(q0.float(), kk.float(), vv.float(), None, ks, 0, 0.25, 1)
    fgrads = torch.ops.dcal.na2d_bwd(
        do.float(), q0.float(), kk.float(), vv.float(), None, o.float(), fl, ks, 0, 0.25, 1
    )
    for name, a, b in zip(NAMES[:3], grads, fgrads):
        _same_bits(name, a, b.to(torch.bfloat16))
    assert bool(grads[0].isinf().any()), "no inf in dq: the overflow case did not happen"


def test_bf16_thread_count_does_not_change_a_bit():
    case = ("clamp", 7, 1, 70, 21, 16, "last")  # 2 x 3 slices of 70 rows: forward bands over threads
    q, k, v, dout, rpb = _inputs(case, B=2, H=3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_simd(q, k, v, dout, rpb, 7, "clamp", 1))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, a, b in zip(("out", "lse", *NAMES), results[0], other):
            _same_bits(name, a, b)


def test_bf16_refuses_mixed_dtypes_before_running():
    q = torch.randn(1, 2, 6, 7, 8).bfloat16()
    rpb = torch.randn(2, 5, 5)
    with pytest.raises(RuntimeError, match="rpb has dtype Float"):
        torch.ops.dcal.na2d_fwd(q, q, q, rpb, 3, 0, 0.3, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.dcal.na2d_fwd(q, q.float(), q, None, 3, 0, 0.3, 1)
    with pytest.raises(TypeError, match="rpb has dtype torch.float32"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=3, rpb=rpb, backend="cpp")


def test_window_ops_check_their_arguments():
    q = torch.randn(1, 1, 5, 5, 8).bfloat16()
    with pytest.raises(RuntimeError, match="kernel_size"):
        torch.ops.dcal._na2d_fwd_window(q, q, q, None, 4, 0, 0.3, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.dcal._na2d_fwd_window(q.half(), q.half(), q.half(), None, 3, 0, 0.3, 1)


_WIDTH_SCRIPT = """
import sys, torch
import dcal.ops
sys.path.insert(0, sys.argv[2])
from test_na2d_cpu_bf16 import CASES, _inputs, _simd
torch.save([_simd(*_inputs(c, seed=5), c[1], c[0], c[2]) for c in CASES], sys.argv[1])
"""


def test_bf16_vector_widths_give_the_same_bits(tmp_path):
    """bf16 on the 32-byte kernels (DCAL_CPU_VECTOR_BITS=256, a subprocess) and on this process's
    (64-byte on AVX-512 CPUs): out, lse, dq, dk, dv the same bits, as for fp32; the bias gradient
    sums its lanes in another grouping (the same value to one bf16 rounding)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "widths.py"
    script.write_text(_WIDTH_SCRIPT)
    env = dict(os.environ, DCAL_CPU_VECTOR_BITS="256")
    path = tmp_path / "256.pt"
    here = str(pathlib.Path(__file__).parent)
    subprocess.run([sys.executable, str(script), str(path), here], env=env, check=True, timeout=300)
    narrow = torch.load(path)
    for case, other in zip(CASES, narrow):
        border, ks, dil = case[:3]
        mine = _simd(*_inputs(case, seed=5), ks, border, dil)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), mine, other):
            _same_bits(name, a, b)
        torch.testing.assert_close(mine[5].float(), other[5].float(), atol=1e-5, rtol=2**-8)
