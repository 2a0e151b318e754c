"""Neighborhood attention writes its output and gradients in the dim order of their inputs (docs/contract.md,
the layout rule): out and dq like q, dk like k, dv like v, dense, dims by decreasing stride with
ties in logical order and broadcast dims outermost; lse and drpb contiguous.

For contiguous, heads-last, channels-first and qkv-slice inputs on every backend (C++ CPU, both its
tiled and per-window kernels; the reference; Triton under the interpreter; the CUDA kernels'
strided writes through the emulator in tests/test_na2d_cpp.py): the strides follow the rule, the
values and every gradient match the reference, the fake implementations give the real strides
exactly (size-1 and broadcast dims included), and the modules hand the op's output to their
projection as a view, so the [B, C, X, Y] interface allocates no more than the output (+ the
gradients).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dcal.ops as ops
from dcal import _ext
from dcal.kernels._layout import dim_order, empty_in_order_of
from dcal.ops import reference

needs_ext = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"

if _ext.HAS_EXTENSION:
    from dcal.ops._cpp_na2d import BORDER_IDS  # registers the fake and autograd of the ops

LAYOUTS = ("contiguous", "heads_last", "channels_first", "qkv_slice")
FP64_TOL = 1e-9


def _views(layout, B, H, X, Y, D, g, dtype=torch.float64):
    """q, k, v [B, H, X, Y, D] as views of one layout, as callers hand them over."""
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if layout == "contiguous":
        return tuple(rand(B, H, X, Y, D) for _ in range(3))
    if layout == "heads_last":  # NATTEN: [B, X, Y, H, D]
        return tuple(rand(B, X, Y, H, D).permute(0, 3, 1, 2, 4) for _ in range(3))
    if layout == "channels_first":  # the BEV block: one [B, 3C, X, Y] conv output, C = H * D
        qkv = rand(B, 3, H, D, X, Y)
        return tuple(qkv[:, i].permute(0, 1, 3, 4, 2) for i in range(3))
    if layout == "qkv_slice":  # NATTEN's module: one [B, X, Y, 3C] projection
        qkv = rand(B, X, Y, 3, H, D)
        return tuple(qkv[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3))
    raise ValueError(layout)


# the memory order of each layout as a permutation of [B, H, X, Y, D]
MEMORY_ORDER = {
    "contiguous": (0, 1, 2, 3, 4),
    "heads_last": (0, 2, 3, 1, 4),
    "qkv_slice": (0, 2, 3, 1, 4),
    "channels_first": (0, 1, 4, 2, 3),
}


def _dense_in(t, layout):
    """t is a dense tensor laid out in the memory order of ``layout``."""
    return t.permute(*MEMORY_ORDER[layout]).is_contiguous()


def _check_rule(name, t, like, layout):
    assert t.stride() == empty_in_order_of(like).stride(), (
        f"{name}: strides {t.stride()}, rule gives {empty_in_order_of(like).stride()} for input strides {like.stride()}"
    )
    assert _dense_in(t, layout), f"{name}: strides {t.stride()} are not a dense {layout} layout"


# ----------------------------------------------------------------------------- the rule itself


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape", [(2, 3, 5, 7, 4), (1, 1, 5, 7, 4), (2, 3, 1, 7, 4), (1, 2, 5, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_rule_keeps_the_layout(layout, shape):
    """Every layout (also with size-1 dims) maps to the dense tensor of its own memory order."""
    q = _views(layout, *shape, torch.Generator().manual_seed(0))[0]
    out = empty_in_order_of(q)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _dense_in(out, layout), (layout, q.stride(), out.stride())
    if torch._prims_common.is_non_overlapping_and_dense_or_false(q) and min(shape) > 1:
        assert out.stride() == q.stride()


def test_rule_ties_and_broadcast_dims():
    # equal strides keep logical order; a broadcast dim (stride 0) is outermost
    t = torch.empty(5, 3).as_strided((4, 2, 3), (3, 3, 1))  # dims 0 and 1 overlap
    assert dim_order(t) == [0, 1, 2]
    b = torch.randn(1, 3, 5, 7, 4).expand(2, 3, 5, 7, 4)
    assert dim_order(b) == [0, 1, 2, 3, 4] and empty_in_order_of(b).is_contiguous()
    h = torch.randn(2, 1, 5, 7, 4).expand(2, 3, 5, 7, 4)
    assert dim_order(h) == [1, 0, 2, 3, 4]


# ----------------------------------------------------------------------------- C++ CPU

# (border, kernel_size, dilation, B, H, X, Y, D, rpb)
CPP_CASES = [
    ("zero", 3, 1, 2, 2, 7, 9, 8, True),
    ("clamp", 5, 1, 1, 3, 9, 6, 16, True),
    ("mask", 3, 2, 1, 2, 9, 11, 8, False),
]


def _cid(c):
    return f"{c[0]}-k{c[1]}-d{c[2]}-{c[3]}x{c[4]}x{c[5]}x{c[6]}x{c[7]}" + ("-rpb" if c[8] else "")


def _cpp_all(q, k, v, rpb, do, ks, border, dil, scale=0.37):
    out, lse = torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, BORDER_IDS[border], scale, dil)
    grads = torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, ks, BORDER_IDS[border], scale, dil)
    return dict(zip(("out", "lse", "dq", "dk", "dv", "drpb"), (out, lse) + tuple(grads)))


@needs_ext
@pytest.mark.parametrize("case", CPP_CASES, ids=_cid)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpp_tiled_layouts(layout, case):
    """fp64 (the tiled kernels): strides by the rule, values and gradients against the reference."""
    border, ks, dil, B, H, X, Y, D, with_rpb = case
    g = torch.Generator().manual_seed(21)
    q, k, v = _views(layout, B, H, X, Y, D, g)
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64) if with_rpb else None
    do = torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64)
    ours = _cpp_all(q, k, v, rpb, empty_in_order_of(q).copy_(do), ks, border, dil)
    for name, like in (("out", q), ("dq", q), ("dk", k), ("dv", v)):
        _check_rule(name, ours[name], like, layout)
    assert ours["lse"].is_contiguous() and ours["drpb"].is_contiguous()
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    leaves += [rpb.clone().requires_grad_()] if with_rpb else []
    ref, ref_lse = reference.neighborhood_attention2d(
        *leaves[:3],
        kernel_size=ks,
        border=border,
        rpb=leaves[3] if with_rpb else None,
        scale=0.37,
        dilation=dil,
        return_lse=True,
    )
    want = dict(zip(("out", "lse", "dq", "dk", "dv", "drpb"), (ref, ref_lse) + torch.autograd.grad(ref, leaves, do)))
    for name, w in want.items():
        err = (ours[name] - w).abs().max().item()
        assert err <= FP64_TOL, f"{name}: max error {err:.3e}"


@needs_ext
@pytest.mark.parametrize("kind", ["bf16", "fp64-nan"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_cpp_window_kernels_layouts(layout, kind):
    """The per-window kernels (bf16, and inputs holding a NaN) write through the output strides:
    the values of contiguous inputs (up to the summation order of a strided head dim; NaN where
    they are NaN), in the rule's layout."""
    B, H, X, Y, D, ks = 1, 2, 7, 9, 16, 5
    g = torch.Generator().manual_seed(22)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float64
    q, k, v = _views(layout, B, H, X, Y, D, g, dtype)
    if kind == "fp64-nan":
        v[0, 1, 3, 4, 5] = float("nan")
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g).to(dtype)
    do = torch.randn(B, H, X, Y, D, generator=g).to(dtype)
    ours = _cpp_all(q, k, v, rpb, do, ks, "zero", 1)
    flat = _cpp_all(q.contiguous(), k.contiguous(), v.contiguous(), rpb, do, ks, "zero", 1)
    for name, like in (("out", q), ("dq", q), ("dk", k), ("dv", v)):
        _check_rule(name, ours[name], like, layout)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    for name in flat:
        torch.testing.assert_close(ours[name], flat[name], equal_nan=True, **tol, msg=lambda m: f"{name}: {m}")
    if kind == "fp64-nan":
        assert ours["out"].isnan().any() and not ours["out"].isnan().all()


def _fake_strides(fn, *tensors):
    with FakeTensorMode() as mode:
        fakes = [None if t is None else mode.from_tensor(t) for t in tensors]
        res = fn(*fakes)
    return [None if t is None else t.stride() for t in res]


# inputs whose strides tie or do not matter: size-1 dims, a broadcast batch
EXTRA_INPUTS = {
    "b1h1-heads_last": lambda g: _views("heads_last", 1, 1, 5, 6, 16, g),
    "b1-channels_first": lambda g: _views("channels_first", 1, 2, 5, 1, 16, g),
    "y1-qkv_slice": lambda g: _views("qkv_slice", 2, 2, 5, 1, 16, g),
    "broadcast-batch": lambda g: tuple(
        torch.randn(1, 2, 5, 6, 16, generator=g, dtype=torch.float64).expand(2, 2, 5, 6, 16) for _ in range(3)
    ),
}
FAKE_INPUTS = {**{lay: (lambda g, lay=lay: _views(lay, 2, 2, 5, 6, 16, g)) for lay in LAYOUTS}, **EXTRA_INPUTS}


@needs_ext
@pytest.mark.parametrize("name", list(FAKE_INPUTS))
def test_cpp_fake_strides_are_real(name):
    """The fake implementations give the C++ outputs' strides exactly (one rule, two languages)."""
    g = torch.Generator().manual_seed(23)
    q, k, v = FAKE_INPUTS[name](g)
    rpb = torch.randn(q.shape[1], 5, 5, generator=g, dtype=torch.float64)

    def fwd(q, k, v, rpb):
        return torch.ops.dcal.na2d_fwd(q, k, v, rpb, 3, BORDER_IDS["zero"], 0.3, 1)

    out, lse = fwd(q, k, v, rpb)
    assert _fake_strides(fwd, q, k, v, rpb) == [out.stride(), lse.stride()]
    for t, like in ((out, q),):
        assert t.stride() == empty_in_order_of(like).stride()
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)

    def bwd(do, q, k, v, rpb, out, lse):
        return torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out, lse, 3, BORDER_IDS["zero"], 0.3, 1)

    grads = bwd(do, q, k, v, rpb, out, lse)
    assert _fake_strides(bwd, do, q, k, v, rpb, out, lse) == [t.stride() for t in grads]
    for t, like in zip(grads[:3], (q, k, v)):
        assert t.stride() == empty_in_order_of(like).stride(), name


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_cpp_opcheck_strided(layout):
    """opcheck (fake tensors, autograd registration, AOT dispatch with dynamic shapes) on views."""
    g = torch.Generator().manual_seed(24)
    q, k, v = (t.float().requires_grad_() for t in _views(layout, 1, 2, 5, 7, 8, g))
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)
    args = (q, k, v, rpb, 3, BORDER_IDS["clamp"], 0.35)
    torch.library.opcheck(torch.ops.dcal.na2d_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.dcal.na2d_fwd(*args)
    bargs = (
        torch.randn(out.shape, generator=g),
        q.detach(),
        k.detach(),
        v.detach(),
        rpb.detach(),
        out,
        lse,
        3,
        BORDER_IDS["clamp"],
        0.35,
    )
    torch.library.opcheck(torch.ops.dcal.na2d_bwd.default, bargs)


# ----------------------------------------------------------------------------- every backend, public op


def _public(
    layout,
    backend,
    device="cpu",
    dtype=torch.float64,
    B=1,
    H=2,
    X=6,
    Y=7,
    D=16,
    ks=3,
    border="clamp",
    dil=1,
    grad_layout=True,
):
    g = torch.Generator().manual_seed(25)
    q, k, v = (t.to(device).requires_grad_() for t in _views(layout, B, H, X, Y, D, g, dtype))
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    do = torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64)
    out = ops.neighborhood_attention2d(
        q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=0.3, dilation=dil, backend=backend
    )
    grads = torch.autograd.grad(out, (q, k, v, rpb), do.to(device, dtype))
    checked = (("out", out, q), ("dq", grads[0], q), ("dk", grads[1], k), ("dv", grads[2], v))
    for name, t, like in checked if grad_layout else checked[:1]:
        _check_rule(name, t, like, layout)
    rs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = reference.neighborhood_attention2d(*rs[:3], kernel_size=ks, border=border, rpb=rs[3], scale=0.3, dilation=dil)
    want = (ref,) + torch.autograd.grad(ref, rs, do)
    return (out,) + grads, want


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_backend_layout(layout):
    """The output in q's dim order; the gradients are autograd's own (the reference is a graph of
    PyTorch ops, not one op with a backward of its own)."""
    ours, want = _public(layout, "reference", grad_layout=False)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, want):
        assert (a - b).abs().max().item() <= FP64_TOL, name


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpp_backend_layout(layout):
    ours, want = _public(layout, "cpp", dil=2, X=7, Y=8)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, want):
        assert (a - b).abs().max().item() <= FP64_TOL, name


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_backend_layout(layout, nan_empty):
    """Triton (the interpreter on CPU): outputs written through their strides, NaN-filled first."""
    ours, want = _public(layout, "triton", device=TRITON_DEVICE, dtype=torch.float32, X=5, Y=7, border="zero")
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize("name", ["heads_last", "channels_first", "b1h1-heads_last", "broadcast-batch"])
def test_triton_fake_strides_are_real(name):
    from dcal.kernels.na2d import launch_config, pack_config
    from dcal.ops._triton_na2d import na2d_bwd_triton, na2d_fwd_triton

    g = torch.Generator().manual_seed(26)
    q, k, v = (t.float().to(TRITON_DEVICE) for t in FAKE_INPUTS[name](g))
    rpb = torch.randn(q.shape[1], 5, 5, generator=g).to(TRITON_DEVICE)
    config = pack_config(launch_config(q.shape[-1], torch.float32))

    def fwd(q, k, v, rpb):
        return na2d_fwd_triton(q, k, v, rpb, 3, "zero", 0.3, config, 1)

    out, lse = fwd(q, k, v, rpb)
    assert _fake_strides(fwd, q, k, v, rpb) == [out.stride(), lse.stride()]
    do = torch.randn(q.shape, generator=g).to(TRITON_DEVICE)

    def bwd(do, q, k, v, rpb, out, lse):
        return na2d_bwd_triton(do, None, q, k, v, rpb, out, lse, 3, "zero", 0.3, config, True, 1)

    grads = bwd(do, q, k, v, rpb, out, lse)
    assert _fake_strides(bwd, do, q, k, v, rpb, out, lse) == [t.stride() for t in grads]
    for t, like in zip((out,) + tuple(grads[:3]), (q, q, k, v)):
        assert t.stride() == empty_in_order_of(like).stride(), name


# ----------------------------------------------------------------------------- modules: no copy


def _capture(monkeypatch, module):
    """The op's outputs during module forwards, and the inputs of the module's proj."""
    import dcal.nn.neighborhood as nbh

    seen = {"q": [], "op": [], "proj": []}
    real = nbh.neighborhood_attention2d

    def spy(q, k, v, **kw):
        out = real(q, k, v, **kw)
        seen["q"].append(q)
        seen["op"].append(out)
        return out

    monkeypatch.setattr(nbh, "neighborhood_attention2d", spy)
    module.proj.register_forward_pre_hook(lambda mod, args: seen["proj"].append(args[0]))
    return seen


def _module_backends():
    return ["reference"] + (["cpp"] if _ext.HAS_EXTENSION else [])


@pytest.mark.parametrize("backend", _module_backends())
def test_natten_module_output_is_a_view(monkeypatch, backend):
    from dcal.nn import NeighborhoodAttention2D

    B, X, Y, C, H = 2, 5, 7, 32, 2
    m = NeighborhoodAttention2D(C, H, 3, backend=backend).double()
    seen = _capture(monkeypatch, m)
    m(torch.randn(B, X, Y, C, dtype=torch.float64))
    op_out, proj_in = seen["op"][0], seen["proj"][0]
    assert _dense_in(op_out, "qkv_slice") and op_out.stride() == empty_in_order_of(seen["q"][0]).stride()
    assert proj_in.shape == (B, X, Y, C) and proj_in.is_contiguous()
    assert proj_in.data_ptr() == op_out.data_ptr(), "the module copied the op's output"


@pytest.mark.parametrize("norm", [None, "layer"])
@pytest.mark.parametrize("backend", _module_backends())
def test_bev_block_output_is_a_view(monkeypatch, backend, norm):
    """norm=None: channels-first all the way; "layer": the qkv conv gets a channels-last input.
    Either way the op's output takes q's dim order and proj gets a view of it."""
    from dcal.nn import LocalGraphAttention

    B, C, X, Y, H = 2, 32, 5, 7, 2
    m = LocalGraphAttention(C, H, 3, norm=norm, backend=backend).double()
    seen = _capture(monkeypatch, m)
    m(torch.randn(B, C, X, Y, dtype=torch.float64))
    q, op_out, proj_in = seen["q"][0], seen["op"][0], seen["proj"][0]
    assert op_out.stride() == empty_in_order_of(q).stride()
    if norm is None:
        assert q.stride(-1) == X * Y and _dense_in(op_out, "channels_first")
    assert proj_in.shape == (B, C, X, Y)
    assert proj_in.is_contiguous() or proj_in.is_contiguous(memory_format=torch.channels_last)
    assert proj_in.data_ptr() == op_out.data_ptr(), "the block copied the op's output"


def _copies(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]


def _allocated_bytes(fn):
    """Bytes the CPU allocator handed out during fn() (every allocation, freed or not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@needs_ext
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_channels_first_interface_memory(mode):
    """The unfold block's interface (bench/neighborhood.py's dcal row): [B, C, X, Y] maps in, viewed per
    head, the op, the output reshaped back to [B, C, X, Y]. It runs no copy kernel and allocates
    the output (+ the three gradients) and per-pixel statistics, nothing map-sized besides."""
    B, H, C, X, Y, ks = 1, 4, 128, 40, 48, 7
    g = torch.Generator().manual_seed(27)
    maps = [torch.randn(B, C, X, Y, generator=g).requires_grad_(mode != "fwd") for _ in range(3)]
    dout = torch.randn(B, C, X, Y, generator=g)

    def heads(t):
        return t.view(B, H, C // H, X, Y).permute(0, 1, 3, 4, 2)

    def step():
        out = ops.neighborhood_attention2d(*map(heads, maps), kernel_size=ks, border="zero", backend="cpp")
        out = out.permute(0, 1, 4, 2, 3).reshape(B, C, X, Y)
        if mode == "fwd":
            return out
        return torch.autograd.grad(out, maps, dout)

    res = step()
    grads = [res] if mode == "fwd" else list(res)
    assert all(t.is_contiguous() for t in grads)  # back in the maps' own layout
    assert not _copies(step), _copies(step)
    map_bytes = B * C * X * Y * 4
    stat_bytes = B * H * X * Y * 4
    floor = map_bytes * (1 if mode == "fwd" else 4)
    got = _allocated_bytes(step)
    # stats: lse, and delta in the backward; bias partials are absent (no rpb)
    assert got <= 1.1 * floor + 2 * stat_bytes, f"{mode}: allocated {got} bytes, floor {floor}"
