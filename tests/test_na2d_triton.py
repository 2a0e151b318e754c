"""Triton 2-D neighborhood attention (kernels/na2d.py) against the reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (set by conftest when there is no GPU) or on CUDA.
Each case runs the kernels once (forward + backward, cached) and is then checked output by
output: forward, lse, dq, dk, dv, drpb each get their own test id. fp32 is judged tightly
against an fp64 reference; fp16/bf16 against the reference's own error at that precision.
"""

import os
import zlib

import pytest
import torch

from dcal.ops import reference
from dcal.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"

# (dtype, atol, rtol) for fp32 against fp64; low precision uses the FA criterion below.
TOL_FP32 = (torch.float32, 2e-5, 1e-4)
# fp16/bf16: the rule of dcal.testing.judging (2x / 3x the error of the reference run in the
# same low precision, plus the dtype's floor).

OUTPUTS = ("out", "lse", "dq", "dk", "dv", "drpb")


def _case_id(c):
    dtype, border, X, Y, ks, D, rpb = c[:7]
    dil = c[7] if len(c) > 7 else 1
    return f"{str(dtype)[6:]}-{border}-{X}x{Y}-k{ks}-d{D}-{'rpb' if rpb else 'norpb'}" + (
        f"-dil{dil}" if dil != 1 else ""
    )


def _cases():
    cases = []
    for border in ("zero", "mask", "clamp"):
        for rpb in (False, True):
            cases.append((torch.float32, border, 5, 9, 3, 16, rpb))
        cases.append((torch.float32, border, 13, 29, 7, 24, True))
        cases.append((torch.float32, border, 7, 10, 5, 40, True))
        if border != "clamp":  # a map smaller than the window (clamp needs X, Y >= k)
            cases.append((torch.float32, border, 4, 6, 7, 16, True))
            cases.append((torch.float32, border, 3, 2, 5, 24, False))
        cases.append((torch.float16, border, 9, 11, 7, 40, True))
        cases.append((torch.float16, border, 5, 9, 3, 16, False))
    # clamp's inverse neighbourhood is the asymmetric one: also without rpb on the larger map
    cases.append((torch.float32, "clamp", 13, 29, 7, 24, False))
    # dilation: every border with and without rpb; sub-grids of unequal lengths (odd sizes),
    # several tiles per sub-grid (11x10 with 4x8 backward tiles), and dilation 3
    for border in ("zero", "mask", "clamp"):
        for rpb in (False, True):
            cases.append((torch.float32, border, 7, 9, 3, 16, rpb, 2))
        cases.append((torch.float32, border, 11, 10, 5, 24, True, 2))
        cases.append((torch.float32, border, 10, 9, 3, 16, True, 3))
    cases.append((torch.float16, "clamp", 7, 9, 3, 16, True, 2))
    # The interpreter multiplies the raw bits of bf16 dot operands (triton issue #11584, not
    # supported upstream), so bf16 runs on CUDA only; the AOT test compiles its kernels.
    cases.append(
        pytest.param(
            (torch.bfloat16, "zero", 9, 11, 7, 40, True),
            marks=pytest.mark.skipif(
                DEVICE == "cpu", reason="the Triton interpreter does not support bf16 tl.dot (triton issue #11584)"
            ),
        )
    )
    return cases


CASES = _cases()
_RESULTS = {}


def _dil(case):
    return case[7] if len(case) > 7 else 1


def _inputs(case):
    dtype, border, X, Y, ks, D, use_rpb = case[:7]
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    B, H = 1, 2
    q, k, v = (torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64) if use_rpb else None
    dout = torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64)
    return q, k, v, rpb, dout


def _reference(q, k, v, rpb, dout, ks, border, scale, dtype, dil=1):
    """Reference outputs and gradients computed in ``dtype`` (inputs rounded to it first)."""
    ts = [t.to(dtype).requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    out, lse = reference.neighborhood_attention2d(
        ts[0], ts[1], ts[2], kernel_size=ks, border=border, rpb=ts[3], scale=scale, dilation=dil, return_lse=True
    )
    leaves = [t for t in ts if t is not None]
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    res = {"out": out.detach(), "lse": lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if rpb is not None:
        res["drpb"] = grads[3]
    return {n: t.double() for n, t in res.items()}


def _kernel(q, k, v, rpb, dout, ks, border, scale, dtype, dil=1):
    from dcal.ops._triton_na2d import na2d_fwd_triton
    from dcal.kernels.na2d import launch_config, pack_config

    ts = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    config = pack_config(launch_config(q.shape[-1], dtype))
    out, lse = na2d_fwd_triton(ts[0], ts[1], ts[2], ts[3], ks, border, scale, config, dil)
    leaves = [t for t in ts if t is not None]
    grads = torch.autograd.grad(out, leaves, dout.to(DEVICE, dtype))
    res = {"out": out.detach(), "lse": lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if rpb is not None:
        res["drpb"] = grads[3]
    return {n: t.double().cpu() for n, t in res.items()}


def _results(case):
    if case not in _RESULTS:
        dtype, border, X, Y, ks, D, use_rpb = case[:7]
        dil = _dil(case)
        q, k, v, rpb, dout = _inputs(case)
        scale = D**-0.5
        r = {
            "ref": _reference(q, k, v, rpb, dout, ks, border, scale, torch.float64, dil),
            "ker": _kernel(q, k, v, rpb, dout, ks, border, scale, dtype, dil),
        }
        if dtype != torch.float32:
            # the reference's own error at this precision, vs the fp64 truth
            r["low"] = _reference(q, k, v, rpb, dout, ks, border, scale, dtype, dil)
        _RESULTS[case] = r
    return _RESULTS[case]


@pytest.mark.parametrize("what", OUTPUTS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_na2d_triton_vs_reference(case, what, nan_empty):
    dtype = case[0]
    use_rpb = case[6]
    if what == "drpb" and not use_rpb:
        pytest.skip("no rpb in this case")
    r = _results(case)
    ref, ker = r["ref"][what], r["ker"][what]
    assert ker.shape == ref.shape
    assert torch.isfinite(ker).all(), f"{what}: non-finite values (a skipped write?)"
    if dtype == torch.float32:
        _, atol, rtol = TOL_FP32
        torch.testing.assert_close(ker, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    else:
        assert_close_to_reference(what, ker, ref, r["low"][what], dtype=dtype)


def test_na2d_public_op_backend_triton(nan_empty):
    """The public op routes backend='triton' to this kernel (CPU tensors under the interpreter)."""
    import dcal.ops

    q, k, v, rpb, _ = _inputs((torch.float32, "mask", 6, 7, 5, 24, True))
    q, k, v, rpb = (t.float().to(DEVICE) for t in (q, k, v, rpb))
    out = dcal.ops.neighborhood_attention2d(q, k, v, kernel_size=5, border="mask", rpb=rpb, backend="triton")
    ref = reference.neighborhood_attention2d(
        q.double(), k.double(), v.double(), kernel_size=5, border="mask", rpb=rpb.double()
    )
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=2e-5, rtol=1e-4)


def test_na2d_triton_lse_gradient():
    """A gradient arriving on the returned lse is folded into the backward exactly."""
    from dcal.ops._triton_na2d import na2d_fwd_triton
    from dcal.kernels.na2d import launch_config, pack_config

    q, k, v, rpb, _ = _inputs((torch.float32, "clamp", 5, 6, 3, 16, True))
    ts = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v, rpb)]
    out, lse = na2d_fwd_triton(*ts, 3, "clamp", 0.25, pack_config(launch_config(16, torch.float32)))
    got = torch.autograd.grad((out.sum() + (lse * 0.7).sum()), ts)
    rs = [t.detach().double().requires_grad_() for t in ts]
    rout, rlse = reference.neighborhood_attention2d(
        *rs[:3], kernel_size=3, border="clamp", rpb=rs[3], scale=0.25, return_lse=True
    )
    want = torch.autograd.grad((rout.sum() + (rlse * 0.7).sum()), rs)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_na2d_triton_no_grad_saves_nothing():
    from dcal.ops._triton_na2d import na2d_triton

    q, k, v, _, _ = _inputs((torch.float32, "zero", 3, 4, 3, 16, False))
    q, k, v = (t.float().to(DEVICE) for t in (q, k, v))
    out = na2d_triton(q, k, v, None, 3, "zero", 0.25)
    assert out.grad_fn is None
    ref = reference.neighborhood_attention2d(
        q.double(), k.double(), v.double(), kernel_size=3, border="zero", scale=0.25
    )
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=2e-5, rtol=1e-4)


def test_na2d_triton_opcheck():
    from dcal.ops._triton_na2d import na2d_fwd_triton
    from dcal.kernels.na2d import launch_config, pack_config

    q, k, v, rpb, _ = _inputs((torch.float32, "zero", 3, 5, 3, 16, True))
    ts = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v, rpb)]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE == "cpu":
        # Tracing a triton_op decomposes it into its kernel launches; the interpreter's kernels
        # cannot take the traced (fake) tensors, so this part runs only on CUDA.
        tests = tests[:3]
    torch.library.opcheck(
        na2d_fwd_triton, (*ts, 3, "zero", 0.25, pack_config(launch_config(16, torch.float32))), test_utils=tests
    )


def test_na2d_aot_specs_cover_launch_choices():
    """Every configuration the launchers pick for kernel size 7 is among the AOT specs."""
    from dcal.kernels import na2d

    specs = na2d.aot_specs()
    seen = {
        (
            s.name,
            s.label.get("dtype"),
            s.constexprs.get("BLOCK_D"),
            s.constexprs.get("HAS_RPB"),
            s.constexprs.get("TILE_X"),
            s.constexprs.get("TILE_Y"),
            s.constexprs.get("BLOCK_N"),
            s.num_warps,
        )
        for s in specs
    }
    for dtype, tt in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for d in range(16, 129, 8):
            c = na2d.launch_config(d, dtype)
            for has_rpb in (False, True):
                for name, p in (("na2d_fwd", c.fwd), ("na2d_bwd_dq", c.bwd), ("na2d_bwd_dkdv", c.bwd)):
                    key = (name, tt, c.block_d, has_rpb, p["TILE_X"], p["TILE_Y"], p["BLOCK_N"], p["num_warps"])
                    assert key in seen, f"launch choice {key} (head dim {d}) has no AOTSpec"


def test_na2d_aot_compile_no_spills():
    """Compile every AOTSpec to sm_80 and sm_90 cubins (no GPU needed) and require no spills."""
    from concurrent.futures import ThreadPoolExecutor

    aot = pytest.importorskip("dcal.testing.aot")
    from dcal.kernels import na2d

    # one subprocess per architecture, side by side (the compiler is single-threaded)
    with ThreadPoolExecutor(2) as pool:
        parts = pool.map(lambda cc: aot.compile_in_subprocess(modules=("dcal.kernels.na2d",), archs=(cc,)), (80, 90))
        rows = [r for part in parts for r in part]
    assert len(rows) == 2 * len(na2d.aot_specs())
    spills = [
        f"{r['name']} {r['arch']} {r['label']} warps={r['num_warps']}: {r['regs']} regs, {r['spill_bytes']} B spilled"
        for r in rows
        if r["spill_bytes"] > 0
    ]
    assert not spills, "configurations that spill:\n" + "\n".join(spills)
    for r in rows:
        assert r["cubin_bytes"] > 0 and r["regs"] <= 255, r
        assert r["shared"] <= 99 * 1024, r  # fits every sm_80+ part, not only the largest


# ----------------------------------------------------------------------------- layouts read in place


def _layout(kind, B, H, X, Y, D, g):
    """A [B, H, X, Y, D] view of fresh fp32 storage in one of the layouts users hand over."""
    if kind == "contiguous":
        return [torch.randn(B, H, X, Y, D, generator=g) for _ in range(3)]
    if kind == "heads_last":  # NATTEN's [B, X, Y, H, D]
        return [torch.randn(B, X, Y, H, D, generator=g).permute(0, 3, 1, 2, 4) for _ in range(3)]
    if kind == "fused_qkv":  # slices of a [B, X, Y, 3, H, D] projection
        qkv = torch.randn(B, X, Y, 3, H, D, generator=g)
        return [qkv[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3)]
    if kind == "channels_first":  # the BEV models' [B, C, X, Y] maps: head-dim stride X*Y
        return [torch.randn(B, H * D, X, Y, generator=g).view(B, H, D, X, Y).permute(0, 1, 3, 4, 2) for _ in range(3)]
    raise AssertionError(kind)


LAYOUTS = ("heads_last", "fused_qkv", "channels_first")


@pytest.mark.parametrize("dil", [1, 2])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_na2d_triton_strided_layouts_in_place(kind, dil, nan_empty, monkeypatch):
    """Strided q/k/v (and a strided dout) give the reference's values and every gradient, and
    the kernels receive the caller's tensors themselves: no copy of any input."""
    from dcal.kernels import na2d as K
    from dcal.ops._triton_na2d import na2d_fwd_triton

    B, H, X, Y, D, ks, border = 1, 2, 7, 6, 16, 3, "clamp" if dil == 1 else "zero"
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{dil}".encode()))
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _layout(kind, B, H, X, Y, D, g))
    assert kind == "contiguous" or not q.is_contiguous()
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g).to(DEVICE).requires_grad_()
    dout = torch.randn(B, X, Y, H, D, generator=g).to(DEVICE).permute(0, 3, 1, 2, 4)

    seen = []
    real_launch = K._launch
    monkeypatch.setattr(
        K, "_launch", lambda kernel, grid, args, *a: seen.append(args) or real_launch(kernel, grid, args, *a)
    )
    out, lse = na2d_fwd_triton(q, k, v, rpb, ks, border, 0.3, K.pack_config(K.launch_config(D, torch.float32)), dil)
    grads = torch.autograd.grad(out, (q, k, v, rpb), dout)
    passed = [a for args in seen for a in args if isinstance(a, torch.Tensor)]
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        assert any(a is t or (a.data_ptr() == t.data_ptr() and a.stride() == t.stride()) for a in passed), (
            f"{name} ({kind}) was copied before reaching the kernels"
        )

    rs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, rpb)]
    rout = reference.neighborhood_attention2d(
        *rs[:3], kernel_size=ks, border=border, rpb=rs[3], scale=0.3, dilation=dil
    )
    want = torch.autograd.grad(rout, rs, dout.double().cpu())
    # out and dq in q's dim order, dk in k's, dv in v's
    from dcal.kernels._layout import empty_in_order_of

    for t, like in zip((out,) + tuple(grads[:3]), (q, q, k, v)):
        assert t.stride() == empty_in_order_of(like).stride()
    _, atol, rtol = TOL_FP32
    torch.testing.assert_close(out.double().cpu(), rout, atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_na2d_public_op_dilation_routes_to_triton(nan_empty):
    """dilation > 1 reaches the Triton backend through the public op (an explicit backend that
    could not run it would raise)."""
    import dcal.ops

    g = torch.Generator().manual_seed(7)
    q, k, v = _layout("heads_last", 1, 2, 8, 7, 16, g)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    out = dcal.ops.neighborhood_attention2d(q, k, v, kernel_size=3, border="clamp", dilation=2, backend="triton")
    ref = reference.neighborhood_attention2d(
        q.double(), k.double(), v.double(), kernel_size=3, border="clamp", dilation=2
    )
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=2e-5, rtol=1e-4)
