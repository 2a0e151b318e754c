"""The C++ (CPU) and CUDA C++ neighborhood attention: ``dcal::na2d_fwd`` / ``dcal::na2d_bwd`` and
the public op with ``backend="cpp"`` against ``dcal.ops.reference.neighborhood_attention2d``.

fp64 must match the reference to 1e-9 (values, logsumexp, and each gradient separately); fp32 by
a tolerance row; bf16 by the rule of dcal.testing.judging: the kernel's error against the fp64 reference is
at most 2x (forward) / 3x (gradients) the error of the reference itself run in bf16, plus the
dtype's floor. The reference is computed once per case.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

import dcal.ops as ops
from dcal import _ext
from dcal.kernels._layout import empty_in_order_of
from dcal.ops import reference
from dcal.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")

if _ext.HAS_EXTENSION:
    from dcal.ops._cpp_na2d import BORDER_IDS  # registers the fake and autograd of the ops

FP64_TOL = 1e-9
# (dtype, atol, rtol) against the fp64 reference
TOLERANCES = [(torch.float32, 2e-6, 1e-5)]
GRADS = ("dq", "dk", "dv", "drpb")

# (border, kernel_size, B, H, X, Y, D, with rpb): odd maps, kernel sizes 3/5/7/9 in every border
# mode, maps smaller than the window (zero/mask), one-row and one-pixel maps, one large map.
CASES = [
    ("zero", 3, 2, 2, 9, 13, 16, True),
    ("mask", 3, 2, 2, 9, 13, 16, True),
    ("clamp", 3, 2, 2, 9, 13, 16, True),
    ("zero", 5, 1, 3, 9, 13, 40, True),
    ("mask", 5, 1, 3, 9, 13, 40, False),
    ("clamp", 5, 1, 3, 9, 13, 40, True),
    ("zero", 7, 2, 1, 9, 13, 8, False),
    ("mask", 7, 2, 1, 9, 13, 8, True),
    ("clamp", 7, 2, 1, 9, 13, 8, True),
    ("zero", 9, 1, 2, 9, 13, 5, True),
    ("mask", 9, 1, 2, 9, 13, 5, True),
    ("clamp", 9, 1, 2, 9, 13, 5, True),
    ("zero", 7, 2, 2, 5, 4, 16, True),  # map smaller than the window
    ("mask", 7, 2, 2, 5, 4, 16, True),
    ("zero", 9, 1, 1, 5, 4, 8, True),
    ("mask", 9, 1, 1, 5, 4, 8, False),
    ("zero", 3, 1, 1, 1, 3, 8, True),  # a single row
    ("mask", 5, 1, 1, 1, 1, 8, True),  # a single pixel
    ("clamp", 5, 1, 2, 5, 5, 24, True),  # clamp on a map exactly the window's size
    ("zero", 7, 1, 1, 113, 203, 4, True),
    ("clamp", 7, 1, 1, 113, 203, 4, True),
]


def _case_id(c):
    border, ks, B, H, X, Y, D, rpb = c
    return f"{border}-k{ks}-{B}x{H}x{X}x{Y}x{D}" + ("-rpb" if rpb else "")


def _inputs(case, dtype, seed=0):
    border, ks, B, H, X, Y, D, with_rpb = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64) if with_rpb else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(rpb), cast(do)


def _grads(fn, q, k, v, rpb, do):
    """(out, lse, dq, dk, dv, drpb) of fn, computed in the inputs' dtype."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + (
        [rpb.detach().requires_grad_()] if rpb is not None else []
    )
    out, lse = fn(*leaves[:3], leaves[3] if rpb is not None else None)
    grads = torch.autograd.grad(out, leaves, do)
    drpb = grads[3] if rpb is not None else None
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2], drpb=drpb)


def _ref_fn(case, scale, dil=1):
    border, ks = case[0], case[1]
    return lambda q, k, v, rpb: reference.neighborhood_attention2d(
        q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=scale, dilation=dil, return_lse=True
    )


def _cpp_fn(case, scale, dil=1):
    border, ks = case[0], case[1]
    return lambda q, k, v, rpb: torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, BORDER_IDS[border], scale, dil)


@functools.lru_cache(maxsize=None)
def _results(case, dtype):
    """(kernel, reference in fp64[, reference in dtype]) for one case, computed once."""
    scale = case[6] ** -0.5 * 1.3  # not the default, so a dropped scale shows
    x = _inputs(case, dtype)
    ours = _grads(_cpp_fn(case, scale), *x)
    ref64 = _grads(_ref_fn(case, scale), *(None if t is None else t.to(torch.float64) for t in x))
    ref_low = _grads(_ref_fn(case, scale), *x) if dtype == torch.bfloat16 else None
    return ours, ref64, ref_low


def _max_err(a, b):
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


@pytest.mark.parametrize("which", ("out", "lse") + GRADS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp64_matches_reference(case, which):
    ours, ref, _ = _results(case, torch.float64)
    if which == "drpb" and ref["drpb"] is None:
        pytest.skip("case has no rpb")
    assert ours[which].dtype == torch.float64
    assert ours[which].shape == ref[which].shape
    assert torch.isfinite(ours[which]).all()
    err = _max_err(ours[which], ref[which])
    assert err <= FP64_TOL, f"{which}: max error {err:.3e} > {FP64_TOL}"


FAST_CASES = [c for c in CASES if c[4] * c[5] < 1000]


@pytest.mark.parametrize("which", ("out",) + GRADS)
@pytest.mark.parametrize(
    "dtype,atol,rtol", [pytest.param(*row, id=str(row[0]).replace("torch.", "")) for row in TOLERANCES]
)
@pytest.mark.parametrize("case", FAST_CASES[::2], ids=_case_id)
def test_fp32_matches_reference(case, dtype, atol, rtol, which):
    ours, ref, _ = _results(case, dtype)
    if which == "drpb" and ref["drpb"] is None:
        pytest.skip("case has no rpb")
    assert ours[which].dtype == dtype
    torch.testing.assert_close(ours[which].to(torch.float64), ref[which], atol=atol, rtol=rtol)


@pytest.mark.parametrize("which", ("out",) + GRADS)
@pytest.mark.parametrize("case", FAST_CASES[1::2], ids=_case_id)
def test_bf16_within_reference_error(case, which):
    ours, ref, ref_low = _results(case, torch.bfloat16)
    if which == "drpb" and ref["drpb"] is None:
        pytest.skip("case has no rpb")
    assert ours[which].dtype == torch.bfloat16
    assert ours["lse"].dtype == torch.float32
    assert_close_to_reference(which, ours[which], ref[which], ref_low[which], dtype=torch.bfloat16)


def test_strided_inputs():
    """[B, X, Y, H, D] storage seen as [B, H, X, Y, D] (what a channels-last module passes)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 7, 6, 3, 8, generator=g, dtype=torch.float64).permute(0, 3, 1, 2, 4) for _ in range(3))
    rpb = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)[:, ::1, ::1]
    assert not q.is_contiguous()
    out, lse = torch.ops.dcal.na2d_fwd(q, k, v, rpb, 5, BORDER_IDS["zero"], 0.4)
    ref, ref_lse = reference.neighborhood_attention2d(q, k, v, kernel_size=5, rpb=rpb, scale=0.4, return_lse=True)
    assert _max_err(out, ref) <= FP64_TOL
    assert _max_err(lse, ref_lse) <= FP64_TOL
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    ours = torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, 5, BORDER_IDS["zero"], 0.4)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rpb)]
    theirs = torch.autograd.grad(
        reference.neighborhood_attention2d(*leaves[:3], kernel_size=5, rpb=leaves[3], scale=0.4), leaves, do
    )
    for name, a, b in zip(GRADS, ours, theirs):
        assert _max_err(a, b) <= FP64_TOL, name


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
def test_gradcheck_public_op(border):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, rpb: ops.neighborhood_attention2d(  # noqa: E731
        q, k, v, kernel_size=3, border=border, rpb=rpb, backend="cpp"
    )
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
def test_opcheck(with_rpb):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True) if with_rpb else None
    args = (q, k, v, rpb, 3, BORDER_IDS["mask"], 0.35)
    torch.library.opcheck(torch.ops.dcal.na2d_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.dcal.na2d_fwd(*args)
    do = torch.randn(out.shape, generator=g)
    bargs = (
        do,
        q.detach(),
        k.detach(),
        v.detach(),
        None if rpb is None else rpb.detach(),
        out,
        lse,
        3,
        BORDER_IDS["mask"],
        0.35,
    )
    torch.library.opcheck(torch.ops.dcal.na2d_bwd.default, bargs)


def test_meta_device_shapes():
    q = torch.empty(2, 3, 9, 11, 16, device="meta", dtype=torch.bfloat16)
    rpb = torch.empty(3, 9, 9, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.dcal.na2d_fwd(q, q, q, rpb, 5, 0, 0.25)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (2, 3, 9, 11) and lse.dtype == torch.float32
    dq, dk, dv, drpb = torch.ops.dcal.na2d_bwd(out, q, q, q, None, out, lse, 5, 0, 0.25)
    assert dq.shape == dk.shape == dv.shape == q.shape and drpb.shape == (0,)


def test_torch_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v, rpb: ops.neighborhood_attention2d(
            q, k, v, kernel_size=5, border="zero", rpb=rpb, backend="cpp"
        ),
        fullgraph=True,
    )
    g = torch.Generator().manual_seed(4)
    for step in range(2):  # the second call must reuse the first graph
        q, k, v = (torch.randn(1, 2, 7, 9, 16, generator=g, requires_grad=True) for _ in range(3))
        rpb = torch.randn(2, 9, 9, generator=g, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = fn(q, k, v, rpb)
        ref = reference.neighborhood_attention2d(q, k, v, kernel_size=5, rpb=rpb)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, rpb))
        for name, a, b in zip(GRADS, grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
def test_backward_deterministic(with_rpb):
    """Two backward runs give the same bits, and so does a run on one thread (no atomics, and the
    bias-gradient blocks do not depend on the thread count)."""
    case = ("clamp", 5, 2, 3, 19, 23, 16, with_rpb)
    q, k, v, rpb, do = _inputs(case, torch.float32, seed=5)
    args = (q, k, v, rpb, 5, BORDER_IDS["clamp"], 0.25)
    out, lse = torch.ops.dcal.na2d_fwd(*args)
    runs = [torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, 5, BORDER_IDS["clamp"], 0.25) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs.append(torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, 5, BORDER_IDS["clamp"], 0.25))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(GRADS, runs[0], run):
            assert torch.equal(a, b), f"{name} differs between runs"


def test_rpb_gradient_off_map_zero_mode():
    """In zero mode off-map keys stay in the softmax, so their bias entries get a gradient; in
    mask mode they get none. On a one-row map every key of row offset -1 or +1 is off the map."""
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(1, 2, 1, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    drpb = {}
    for border in ("zero", "mask"):
        out, lse = torch.ops.dcal.na2d_fwd(q, k, v, rpb, 3, BORDER_IDS[border], 0.3)
        drpb[border] = torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, 3, BORDER_IDS[border], 0.3)[3]
    # table rows: index = di + ks - 1, so di = -1, 0, +1 are rows 1, 2, 3; columns likewise
    assert (drpb["zero"][:, [1, 3]][:, :, 1:4] != 0).all()
    assert (drpb["mask"][:, [1, 3]] == 0).all()
    assert (drpb["mask"][:, 2, 1:4] != 0).all()
    for border in ("zero", "mask"):  # offsets beyond the centred window are never used
        assert (drpb[border][:, [0, 4]] == 0).all() and (drpb[border][:, :, [0, 4]] == 0).all()


@pytest.mark.skipif(
    not shutil.which("nvcc") and not os.path.exists("/usr/local/cuda-13.0/bin/nvcc"), reason="nvcc not found"
)
def test_cuda_kernels_compiled_in():
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA build")
    if not _ext.built_with_cuda():
        # CI builds with CUDA (and must); a developer's fast DCAL_NO_CUDA=1 build is skipped.
        assert not os.environ.get("CI"), "torch has CUDA and nvcc is present, but CI built dcal._C without CUDA"
        pytest.skip("dcal._C was built with DCAL_NO_CUDA=1; rebuild without it to check the CUDA kernels")
    import dcal._C  # noqa: F401

    for op in ("dcal::na2d_fwd", "dcal::na2d_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"


def test_matches_natten_clamp_forward():
    natten = pytest.importorskip("natten")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 9, 11, 16, generator=g) for _ in range(3))
    ours = ops.neighborhood_attention2d(q, k, v, kernel_size=5, border="clamp", backend="cpp")
    heads_last = lambda t: t.permute(0, 2, 3, 1, 4).contiguous()  # noqa: E731  NATTEN: [B, X, Y, H, D]
    theirs = natten.na2d(heads_last(q), heads_last(k), heads_last(v), kernel_size=5).permute(0, 3, 1, 2, 4)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_c_op_errors_name_the_argument():
    q = torch.randn(1, 2, 6, 6, 8)
    with pytest.raises(RuntimeError, match="rpb must have shape"):
        torch.ops.dcal.na2d_fwd(q, q, q, torch.randn(2, 4, 4), 3, 0, 1.0)
    with pytest.raises(RuntimeError, match="kernel_size must be an odd int"):
        torch.ops.dcal.na2d_fwd(q, q, q, None, 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="border must be"):
        torch.ops.dcal.na2d_fwd(q, q, q, None, 3, 7, 1.0)
    with pytest.raises(RuntimeError, match="clamp needs a map"):
        torch.ops.dcal.na2d_fwd(q, q, q, None, 7, 2, 1.0)
    with pytest.raises(RuntimeError, match="k has shape"):
        torch.ops.dcal.na2d_fwd(q, q[..., :4], q, None, 3, 0, 1.0)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.dcal.na2d_fwd(q.half(), q.half(), q.half(), None, 3, 0, 1.0)
    out, lse = torch.ops.dcal.na2d_fwd(q, q, q, None, 3, 0, 1.0)
    with pytest.raises(RuntimeError, match="lse has dtype"):
        torch.ops.dcal.na2d_bwd(out, q, q, q, None, out, lse.double(), 3, 0, 1.0)
    # float16 on CPU: the public op runs the float32 kernels on float32 copies (docs/inputs.md)
    out16 = ops.neighborhood_attention2d(q.half(), q.half(), q.half(), backend="cpp")
    assert out16.dtype == torch.float16


# ----------------------------------------------------------------------------- layouts and dilation


def _layout(t, layout):
    """The values of contiguous [B, H, X, Y, D] ``t`` as a [B, H, X, Y, D] view of another storage:
    NATTEN's heads-last [B, X, Y, H, D], the middle slice of a fused [B, X, Y, 3, H, D] qkv
    projection, or a channels-first [B, C, X, Y] map (head-dim stride X*Y)."""
    B, H, X, Y, D = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "heads_last":
        return t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    if layout == "qkv_slice":
        buf = torch.full((B, X, Y, 3, H, D), float("nan"), dtype=t.dtype, device=t.device)
        buf[:, :, :, 1] = t.permute(0, 2, 3, 1, 4)
        return buf[:, :, :, 1].permute(0, 3, 1, 2, 4)
    if layout == "channels_first":
        # [B, C, X, Y], contiguous (with H == 1 the reshape alone would be a view of t)
        maps = t.permute(0, 1, 4, 2, 3).reshape(B, H * D, X, Y).contiguous()
        return maps.view(B, H, D, X, Y).permute(0, 1, 3, 4, 2)
    if layout == "xy_transposed":  # what a gradient may arrive as
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


# (case, dilation, layout of q/k/v): dilation 2-4 in every border mode, each input layout, head
# dims that leave part of a CUDA head-dim bucket idle (24, 40), a dilated window larger than the
# map and a clamp map of exactly kernel_size * dilation.
LAYOUT_CASES = [
    (("zero", 3, 2, 2, 9, 11, 16, True), 2, "heads_last"),
    (("mask", 5, 1, 3, 13, 10, 24, True), 2, "channels_first"),
    (("clamp", 3, 2, 2, 9, 11, 16, True), 2, "qkv_slice"),
    (("clamp", 5, 1, 2, 15, 16, 40, True), 3, "channels_first"),
    (("zero", 3, 1, 1, 5, 6, 16, False), 4, "contiguous"),
    (("mask", 7, 2, 2, 9, 13, 32, True), 1, "heads_last"),
    (("clamp", 3, 1, 2, 6, 7, 16, True), 2, "channels_first"),
    (("zero", 5, 2, 2, 9, 13, 64, True), 2, "qkv_slice"),
]


def _layout_id(c):
    case, dil, layout = c
    return f"{_case_id(case)}-dil{dil}-{layout}"


def _check_layout_case(c, dtype, device):
    """Kernel on q, k, v in the case's layout (dO heads-last) against the fp64 reference on
    contiguous inputs: out, lse and every gradient; out and dq come back in q's dim order, dk in
    k's, dv in v's (dcal.kernels._layout.empty_in_order_of), lse and drpb contiguous."""
    case, dil, layout = c
    scale = case[6] ** -0.5
    q, k, v, rpb, do = (None if t is None else t.to(device) for t in _inputs(case, dtype, seed=8))
    views = [_layout(t, layout) for t in (q, k, v)]
    if layout != "contiguous":
        assert not any(t.is_contiguous() for t in views)
    ours = _grads(_cpp_fn(case, scale, dil), *views, rpb, _layout(do, "heads_last"))
    ref = _grads(_ref_fn(case, scale, dil), *(None if t is None else t.double() for t in (q, k, v, rpb, do)))
    ref_low = _grads(_ref_fn(case, scale, dil), q, k, v, rpb, do) if dtype != torch.float64 else None
    for which in ("out", "lse") + GRADS:
        if ref[which] is None:
            continue
        like = {"out": views[0], "dq": views[0], "dk": views[1], "dv": views[2]}.get(which)
        if like is None:
            assert ours[which].is_contiguous(), which
        else:
            assert ours[which].stride() == empty_in_order_of(like).stride(), which
        err = _max_err(ours[which], ref[which])
        big = max(1.0, ref[which].abs().max().item())
        if dtype == torch.float64:
            assert err <= FP64_TOL, f"{which}: max error {err:.3e}"
        elif dtype == torch.float32:
            assert err <= 2e-5 * big, f"{which}: max error {err:.3e}"
        else:
            assert_close_to_reference(which, ours[which], ref[which], ref_low[which], dtype=dtype)


@pytest.mark.parametrize("c", LAYOUT_CASES, ids=_layout_id)
def test_dilated_strided_inputs(c):
    _check_layout_case(c, torch.float64, "cpu")


# The CUDA kernels themselves, compiled by g++ with every GPU thread a ucontext
# (tests/na2d_cuda_emu.cpp): their index arithmetic checked where no GPU runs them. Small cases.
EMU_CASES = [
    (("zero", 3, 1, 2, 5, 6, 16, True), 2, "heads_last"),
    (("clamp", 3, 1, 1, 6, 7, 24, True), 2, "channels_first"),
    (("mask", 5, 1, 1, 5, 7, 40, True), 1, "qkv_slice"),
    (("zero", 3, 2, 1, 4, 5, 16, False), 3, "contiguous"),
]


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    import ctypes
    import subprocess

    cxx = shutil.which("g++")
    inc = next(
        (
            os.path.join(h, "include")
            for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda")
            if h and os.path.exists(os.path.join(h, "include", "cuda_fp16.h"))
        ),
        None,
    )
    if cxx is None or inc is None:
        pytest.skip("g++ or the CUDA headers (cuda_fp16.h) not found")
    here = os.path.dirname(os.path.abspath(__file__))
    lib = str(tmp_path_factory.mktemp("na2d_emu") / "libna2d_emu.so")
    subprocess.run(
        [
            cxx,
            "-O1",
            "-std=c++20",
            "-shared",
            "-fPIC",
            "-I",
            os.path.join(here, "..", "csrc"),
            "-I",
            inc,
            os.path.join(here, "na2d_cuda_emu.cpp"),
            "-o",
            lib,
        ],
        check=True,
        capture_output=True,
    )
    return ctypes.CDLL(lib)


@pytest.mark.parametrize("c", EMU_CASES, ids=_layout_id)
def test_cuda_kernels_emulated(cuda_emulator, c):
    """The CUDA forward and the three backward kernels (float32) on strided, dilated inputs, dO
    broadcast over the batch and out read heads-last, against the fp64 reference. Outputs are
    allocated as the host code allocates them (out and dq in q's dim order, dk in k's, dv in v's:
    channels-first or heads-last for such inputs), NaN-filled, and written through their strides."""
    import ctypes

    (border, ks, B, H, X, Y, D, with_rpb), dil, layout = c
    scale = D**-0.5 * 1.3
    q, k, v, rpb, do = _inputs(c[0], torch.float32, seed=10)
    views = [_layout(t, layout) for t in (q, k, v)]
    dov = do[:1].expand(do.shape)  # batch stride 0
    ptr = lambda t: ctypes.c_void_p(0 if t is None else t.data_ptr())  # noqa: E731
    strides = lambda t: (ctypes.c_int64 * 5)(*t.stride())  # noqa: E731
    geo = (ctypes.c_int * 8)(B, H, X, Y, D, ks, BORDER_IDS[border], dil)
    qkv = [a for t in views for a in (ptr(t), strides(t))]
    nan = lambda *shape: torch.full(shape, float("nan"))  # noqa: E731
    like = lambda t: empty_in_order_of(t).fill_(float("nan"))  # noqa: E731
    out, lse = like(views[0]), nan(B, H, X, Y)
    if layout in ("heads_last", "channels_first"):
        assert not out.is_contiguous()
    cuda_emulator.emu_fwd(geo, ctypes.c_float(scale), *qkv, ptr(rpb), ptr(out), strides(out), ptr(lse))
    outv = _layout(out, "heads_last")
    dq, dk, dv, delta = like(views[0]), like(views[1]), like(views[2]), nan(B, H, X, Y)
    drpb = None if rpb is None else nan(*rpb.shape)
    cuda_emulator.emu_bwd(
        geo,
        ctypes.c_float(scale),
        *qkv,
        ptr(rpb),
        ptr(outv),
        strides(outv),
        ptr(dov),
        strides(dov),
        ptr(lse),
        ptr(delta),
        ptr(dq),
        strides(dq),
        ptr(dk),
        strides(dk),
        ptr(dv),
        strides(dv),
        ptr(drpb),
    )
    ref = _grads(_ref_fn(c[0], scale, dil), *(None if t is None else t.double() for t in (q, k, v, rpb, dov)))
    ours = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, drpb=drpb)
    for which in ("out", "lse") + GRADS:
        if ref[which] is None:
            continue
        err = _max_err(ours[which], ref[which])
        assert err <= 2e-5 * max(1.0, ref[which].abs().max().item()), f"{which}: max error {err:.3e}"


# ----------------------------------------------------------------------------- CUDA twins


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[6] % 8 == 0 and c[6] >= 16], ids=_case_id)
def test_cuda_matches_reference(case, dtype):
    if not _ext.built_with_cuda():
        pytest.skip("dcal._C built without CUDA")
    scale = case[6] ** -0.5
    x = [None if t is None else t.cuda() for t in _inputs(case, dtype)]
    ours = _grads(_cpp_fn(case, scale), *x)
    ref = _grads(_ref_fn(case, scale), *(None if t is None else t.double() for t in x))
    ref_low = _grads(_ref_fn(case, scale), *x)
    for which in ("out", "lse") + GRADS:
        if ref[which] is None:
            continue
        err = _max_err(ours[which], ref[which])
        if dtype == torch.float32:
            assert err <= 2e-5 * max(1.0, ref[which].abs().max().item()), which
        else:
            assert_close_to_reference(which, ours[which], ref[which], ref_low[which], dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", LAYOUT_CASES, ids=_layout_id)
def test_cuda_dilated_strided_inputs(c, dtype):
    """The CUDA kernels read every layout through its strides and step windows by the dilation."""
    if not _ext.built_with_cuda():
        pytest.skip("dcal._C built without CUDA")
    _check_layout_case(c, dtype, "cuda")


@pytest.mark.cuda
def test_cuda_public_op_dilated_channels_first():
    """The public op routes dilation 2 on CUDA to the "cpp" backend (no longer refused) and reads a
    channels-first map without copying it: peak memory stays within 1.1x out + lse."""
    if not _ext.built_with_cuda():
        pytest.skip("dcal._C built without CUDA")
    B, H, X, Y, D = 2, 4, 64, 64, 32
    g = torch.Generator().manual_seed(9)
    maps = [torch.randn(B, H * D, X, Y, generator=g).cuda() for _ in range(3)]
    q, k, v = (m.view(B, H, D, X, Y).permute(0, 1, 3, 4, 2) for m in maps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.neighborhood_attention2d(q, k, v, kernel_size=5, border="clamp", dilation=2, backend="cpp")
    torch.cuda.synchronize()
    floor = out.numel() * out.element_size() + B * H * X * Y * 4  # out + lse
    assert torch.cuda.max_memory_allocated() - base <= 1.1 * floor
    ref = reference.neighborhood_attention2d(
        q.double(), k.double(), v.double(), kernel_size=5, border="clamp", dilation=2
    )
    assert _max_err(out, ref) <= 2e-5 * max(1.0, ref.abs().max().item())
