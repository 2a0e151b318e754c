"""The C++ CPU neighborhood attention reads q, k, v (and dout, out in the backward) in place,
whatever their layout: contiguous [B, H, X, Y, D], NATTEN's heads-last [B, X, Y, H, D], slices
of a fused qkv projection, and channels-first [B, C, X, Y] maps viewed as [B, H, D, X, Y] (a
head-dim stride of X*Y). Each layout against the fp64 reference (values and every gradient, in
every border mode, with and without dilation; outputs and gradients in their inputs' dim order),
and a check that the kernels allocate nothing but their outputs (the allocator's own record of the
call, through torch.profiler).
"""

from __future__ import annotations

import pytest
import torch

from dcal import _ext
from dcal.kernels._layout import empty_in_order_of
from dcal.ops import reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")

if _ext.HAS_EXTENSION:
    from dcal.ops._cpp_na2d import BORDER_IDS  # registers the fake and autograd of the ops

FP64_TOL = 1e-9
LAYOUTS = ("contiguous", "heads_last", "fused_qkv", "channels_first")


def _three(layout, B, H, X, Y, D, g, dtype):
    """q, k, v [B, H, X, Y, D] as views of one layout (never contiguous except 'contiguous')."""
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if layout == "contiguous":
        return tuple(rand(B, H, X, Y, D) for _ in range(3))
    if layout == "heads_last":  # NATTEN: [B, X, Y, H, D]
        return tuple(rand(B, X, Y, H, D).permute(0, 3, 1, 2, 4) for _ in range(3))
    if layout == "fused_qkv":  # one projection [B, X, Y, 3, H, D], split without a copy
        qkv = rand(B, X, Y, 3, H, D)
        return tuple(qkv[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3))
    if layout == "channels_first":  # the BEV models' [B, C, X, Y] maps, C = H * D
        return tuple(rand(B, H * D, X, Y).view(B, H, D, X, Y).permute(0, 1, 3, 4, 2) for _ in range(3))
    raise ValueError(layout)


def _strided_like(t, g):
    """A channels-first copy of a [B, H, X, Y, D] tensor seen as [B, H, X, Y, D] (dout/out views)."""
    B, H, X, Y, D = t.shape
    cf = torch.empty(B, H, D, X, Y, dtype=t.dtype).permute(0, 1, 3, 4, 2)
    cf.copy_(t)
    return cf


# (border, kernel_size, dilation, B, H, X, Y, D, with rpb)
CASES = [
    ("zero", 3, 1, 2, 2, 7, 9, 8, True),
    ("mask", 5, 1, 1, 3, 9, 6, 16, True),
    ("clamp", 3, 1, 2, 2, 7, 9, 8, True),
    ("zero", 3, 2, 1, 2, 9, 11, 8, True),
    ("mask", 3, 2, 1, 2, 9, 11, 8, False),
    ("clamp", 3, 2, 1, 2, 9, 11, 8, True),
]


def _cid(c):
    return f"{c[0]}-k{c[1]}-d{c[2]}-{c[3]}x{c[4]}x{c[5]}x{c[6]}x{c[7]}" + ("-rpb" if c[8] else "")


@pytest.mark.parametrize("case", CASES, ids=_cid)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_reference(layout, case):
    border, ks, dil, B, H, X, Y, D, with_rpb = case
    g = torch.Generator().manual_seed(11)
    q, k, v = _three(layout, B, H, X, Y, D, g, torch.float64)
    if layout != "contiguous":
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64) if with_rpb else None
    do = _strided_like(torch.randn(B, H, X, Y, D, generator=g, dtype=torch.float64), g)
    scale = 0.37
    out, lse = torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, BORDER_IDS[border], scale, dil)
    assert out.stride() == empty_in_order_of(q).stride() and lse.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([rpb.clone().requires_grad_()] if with_rpb else [])
    ref, ref_lse = reference.neighborhood_attention2d(
        *leaves[:3],
        kernel_size=ks,
        border=border,
        rpb=leaves[3] if with_rpb else None,
        scale=scale,
        dilation=dil,
        return_lse=True,
    )
    assert (out - ref).abs().max().item() <= FP64_TOL
    assert (lse - ref_lse).abs().max().item() <= FP64_TOL
    ref_grads = torch.autograd.grad(ref, leaves, do)
    # the backward also reads dout and out through their strides
    grads = torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, _strided_like(out, g), lse, ks, BORDER_IDS[border], scale, dil)
    for name, a, b, like in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads, (q, k, v, None)):
        assert a.is_contiguous() if like is None else a.stride() == empty_in_order_of(like).stride(), name
        assert a.shape == b.shape, name
        err = (a - b).abs().max().item()
        assert err <= FP64_TOL, f"{name}: max error {err:.3e}"


def _allocated_bytes(fn):
    """Bytes the CPU allocator handed out during fn() (every allocation, freed or not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_input_copy(layout):
    """Forward: the allocations are out + lse; backward: dq, dk, dv + per-query and bias statistics.
    A copy of one input alone would add a whole q-sized buffer (1/3 of dq + dk + dv)."""
    B, H, X, Y, D, ks = 1, 4, 48, 40, 32, 7
    g = torch.Generator().manual_seed(12)
    q, k, v = _three(layout, B, H, X, Y, D, g, torch.float32)
    rpb = torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g)
    qbytes = q.numel() * q.element_size()
    stat_bytes = B * H * X * Y * 4
    res = {}

    def fwd():
        res["fwd"] = torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, BORDER_IDS["clamp"], 0.2, 1)

    fwd_bytes = _allocated_bytes(fwd)
    out, lse = res["fwd"]
    assert fwd_bytes <= 1.1 * qbytes + stat_bytes, f"forward allocated {fwd_bytes} bytes, output is {qbytes}"
    do = _strided_like(torch.randn(out.shape, generator=g), g)
    out_view = _strided_like(out, g)

    def bwd():
        res["bwd"] = torch.ops.dcal.na2d_bwd(do, q, k, v, rpb, out_view, lse, ks, BORDER_IDS["clamp"], 0.2, 1)

    bwd_bytes = _allocated_bytes(bwd)
    assert bwd_bytes <= 1.1 * 3 * qbytes + stat_bytes + (1 << 20), (
        f"backward allocated {bwd_bytes} bytes, gradients are {3 * qbytes}"
    )
