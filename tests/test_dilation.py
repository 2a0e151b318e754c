"""Dilated neighborhood attention (docs/contract.md, Dilation): the reference against independent formulations
(dilated ``F.unfold`` for zero, per-query brute force for mask, NATTEN's own window-start rule
and NATTEN's forward for clamp), then every CPU backend against the reference in fp64, forward,
logsumexp and every gradient, and the bad-input errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dcal.ops as ops
from dcal import _ext
from dcal.ops import reference

DT = torch.float64


def rand(*shape, gen=None):
    return torch.randn(*shape, dtype=DT, generator=gen)


def unfold_na_dilated(q, k, v, ks, dil, rpb, scale):
    """F.pad(0) + F.unfold(dilation=d, padding=d * (ks // 2)): the zero border, as a user writes it."""
    B, H, X, Y, D = q.shape
    r = ks // 2
    to_maps = lambda t: t.permute(0, 1, 4, 2, 3).reshape(B * H, D, X, Y)  # noqa: E731
    ku = F.unfold(to_maps(k), ks, dilation=dil, padding=dil * r).view(B, H, D, ks * ks, X * Y)
    vu = F.unfold(to_maps(v), ks, dilation=dil, padding=dil * r).view(B, H, D, ks * ks, X * Y)
    qq = q.permute(0, 1, 4, 2, 3).reshape(B, H, D, 1, X * Y)
    logits = (qq * ku).sum(2) * scale  # [B, H, ks*ks, XY]
    if rpb is not None:  # window step (a - r, b - r) -> rpb index (a - r + ks - 1, b - r + ks - 1)
        logits = logits + rpb[:, r : r + ks, r : r + ks].reshape(H, ks * ks, 1)
    p = logits.softmax(2)
    return (p.unsqueeze(2) * vu).sum(3).view(B, H, D, X, Y).permute(0, 1, 3, 4, 2)


def natten_window_start(index, length, ks, dil):
    """NATTEN's window start for dilated clamp windows, written as NATTEN's C++ helper states it
    (not through our sub-grid formulation)."""
    nb = ks // 2
    if dil <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    ni = index - nb * dil
    if ni < 0:
        return index % dil
    if index + nb * dil >= length:
        imodd = index % dil
        a = (length // dil) * dil
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dil
        return a + imodd - ks * dil
    return ni


def brute_na(q, k, v, ks, border, dil, rpb, scale):
    B, H, X, Y, D = q.shape
    r = ks // 2
    out = torch.zeros_like(q)
    for i, j in itertools.product(range(X), range(Y)):
        if border == "clamp":
            i0, j0 = natten_window_start(i, X, ks, dil), natten_window_start(j, Y, ks, dil)
        else:
            i0, j0 = i - dil * r, j - dil * r
        keys = [(i0 + dil * a, j0 + dil * b) for a in range(ks) for b in range(ks)]
        if border == "mask":
            keys = [(a, b) for a, b in keys if 0 <= a < X and 0 <= b < Y]
        logits, vals = [], []
        for a, b in keys:
            inside = 0 <= a < X and 0 <= b < Y
            assert inside or border != "clamp"
            kv = k[:, :, a, b] if inside else torch.zeros_like(k[:, :, 0, 0])
            vals.append(v[:, :, a, b] if inside else torch.zeros_like(v[:, :, 0, 0]))
            lg = (q[:, :, i, j] * kv).sum(-1) * scale
            if rpb is not None:
                assert (a - i) % dil == 0 and (b - j) % dil == 0
                lg = lg + rpb[:, (a - i) // dil + ks - 1, (b - j) // dil + ks - 1]
            logits.append(lg)
        p = torch.stack(logits, -1).softmax(-1)
        out[:, :, i, j] = (p.unsqueeze(-1) * torch.stack(vals, 2)).sum(2)
    return out


@pytest.mark.parametrize("X,Y,ks,dil", [(9, 11, 3, 2), (7, 13, 5, 3), (4, 5, 3, 2), (12, 10, 3, 4)], ids=str)
@pytest.mark.parametrize("with_rpb", [False, True], ids=["norpb", "rpb"])
def test_reference_zero_matches_dilated_unfold(X, Y, ks, dil, with_rpb):
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(2, 2, X, Y, 8, gen=g) for _ in range(3))
    rpb = rand(2, 2 * ks - 1, 2 * ks - 1, gen=g) if with_rpb else None
    got = reference.neighborhood_attention2d(q, k, v, kernel_size=ks, border="zero", rpb=rpb, scale=0.6, dilation=dil)
    torch.testing.assert_close(got, unfold_na_dilated(q, k, v, ks, dil, rpb, 0.6), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("border", ["mask", "clamp", "zero"])
@pytest.mark.parametrize("X,Y,ks,dil", [(9, 11, 3, 2), (10, 7, 3, 2), (9, 16, 3, 3), (15, 15, 5, 3)], ids=str)
def test_reference_matches_brute_force(border, X, Y, ks, dil):
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand(1, 2, X, Y, 4, gen=g) for _ in range(3))
    rpb = rand(2, 2 * ks - 1, 2 * ks - 1, gen=g)
    got = reference.neighborhood_attention2d(q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=0.5, dilation=dil)
    torch.testing.assert_close(got, brute_na(q, k, v, ks, border, dil, rpb, 0.5), atol=1e-12, rtol=1e-12)


def test_reference_clamp_window_sees_kernel_squared_real_pixels():
    X, Y, ks, dil = 11, 9, 3, 3
    q = torch.zeros(1, 1, X, Y, X * Y, dtype=DT)
    v = torch.eye(X * Y, dtype=DT).view(1, 1, X, Y, X * Y)
    out = reference.neighborhood_attention2d(q, q, v, kernel_size=ks, border="clamp", dilation=dil)
    assert ((out > 0).sum(-1) == ks * ks).all()


@pytest.mark.parametrize("ks,dil", [(3, 2), (5, 2), (7, 2), (3, 3)], ids=str)
def test_clamp_matches_natten_forward(ks, dil):
    natten = pytest.importorskip("natten")
    g = torch.Generator().manual_seed(7)
    X, Y = ks * dil + 3, ks * dil + 1
    q, k, v = (torch.randn(1, 2, X, Y, 16, generator=g) for _ in range(3))
    heads_last = lambda t: t.permute(0, 2, 3, 1, 4).contiguous()  # noqa: E731  NATTEN: [B, X, Y, H, D]
    theirs = natten.na2d(heads_last(q), heads_last(k), heads_last(v), kernel_size=ks, dilation=dil).permute(
        0, 3, 1, 2, 4
    )
    for backend in ["reference"] + (["cpp"] if _ext.HAS_EXTENSION else []):
        ours = ops.neighborhood_attention2d(q, k, v, kernel_size=ks, border="clamp", dilation=dil, backend=backend)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


# (border, kernel_size, dilation, X, Y, with rpb): odd maps, maps smaller than the dilated window
CASES = [
    ("zero", 3, 2, 9, 11, True),
    ("mask", 3, 2, 9, 11, True),
    ("clamp", 3, 2, 9, 11, True),
    ("zero", 5, 3, 7, 16, True),
    ("mask", 5, 3, 7, 16, False),
    ("clamp", 5, 3, 15, 16, True),
    ("zero", 3, 4, 5, 6, True),  # dilated window larger than the map
    ("mask", 3, 4, 5, 6, True),
    ("clamp", 3, 2, 6, 7, True),  # clamp on a map exactly kernel_size * dilation
]


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpp_fp64_matches_reference(case):
    border, ks, dil, X, Y, with_rpb = case
    g = torch.Generator().manual_seed(3)
    q, k, v = (rand(2, 2, X, Y, 8, gen=g).requires_grad_() for _ in range(3))
    rpb = rand(2, 2 * ks - 1, 2 * ks - 1, gen=g).requires_grad_() if with_rpb else None
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    dout = rand(2, 2, X, Y, 8, gen=g)
    ref, ref_lse = reference.neighborhood_attention2d(
        q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=0.4, dilation=dil, return_lse=True
    )
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    from dcal.ops._cpp_na2d import BORDER_IDS

    out, lse = torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, BORDER_IDS[border], 0.4, dil)
    torch.testing.assert_close(lse, ref_lse, atol=1e-9, rtol=1e-9)
    got = ops.neighborhood_attention2d(
        q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=0.4, dilation=dil, backend="cpp"
    )
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)
    grads = torch.autograd.grad(got, inputs, dout)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
def test_cpp_gradcheck_dilated():
    g = torch.Generator().manual_seed(4)
    q, k, v = (rand(1, 1, 7, 6, 4, gen=g).requires_grad_() for _ in range(3))
    rpb = rand(1, 5, 5, gen=g).requires_grad_()
    fn = lambda q, k, v, rpb: ops.neighborhood_attention2d(  # noqa: E731
        q, k, v, kernel_size=3, border="zero", rpb=rpb, dilation=2, backend="cpp"
    )
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_bad_dilation_is_refused_by_name():
    q = torch.randn(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=3, dilation=0)
    with pytest.raises(TypeError, match="dilation must be an int"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=3, dilation=1.5)
    with pytest.raises(TypeError, match="dilation must be an int"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=3, dilation=True)
    # clamp needs kernel_size * dilation pixels per axis (every sub-grid holds a whole window)
    with pytest.raises(ValueError, match=r"kernel_size\*dilation.*9x9.*got 8x8"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=3, border="clamp", dilation=3)
    if _ext.HAS_EXTENSION:
        with pytest.raises(RuntimeError, match="dilation must be an int >= 1"):
            torch.ops.dcal.na2d_fwd(q, q, q, None, 3, 0, 1.0, 0)
        with pytest.raises(RuntimeError, match="clamp needs a map"):
            torch.ops.dcal.na2d_fwd(q, q, q, None, 3, 2, 1.0, 3)


def test_every_backend_takes_dilation():
    q = torch.randn(1, 1, 9, 9, 16)
    text = ops.explain("neighborhood_attention2d", q, dilation=2)
    assert "cpp        chosen" in text or not _ext.HAS_EXTENSION, text
