"""The reference ops against independent formulas (not against themselves), and fp64 gradcheck."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dcal.ops import reference

DT = torch.float64


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=DT, requires_grad=requires_grad)


# ----------------------------------------------------------------------------- PWCA


@pytest.mark.parametrize("nq,n1,n2,d", [(1, 5, 3, 16), (37, 5, 130, 40), (9, 9, 9, 64)], ids=lambda v: str(v))
def test_pwca_matches_sdpa_over_cat(nq, n1, n2, d):
    torch.manual_seed(0)
    q, k1, v1, k2, v2 = rand(2, 3, nq, d), rand(2, 3, n1, d), rand(2, 3, n1, d), rand(2, 3, n2, d), rand(2, 3, n2, d)
    out, lse = reference.pwca_attention(q, k1, v1, k2, v2, scale=0.3, return_lse=True)
    k, v = torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    # lse from its definition, one query row at a time
    s = (q @ k.transpose(-1, -2)) * 0.3
    want_lse = s.max(-1).values + torch.log(torch.exp(s - s.max(-1, keepdim=True).values).sum(-1))
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_multi_kv_three_segments_default_scale():
    torch.manual_seed(1)
    q = rand(1, 2, 4, 8)
    segs = [(rand(1, 2, n, 8), rand(1, 2, n, 8)) for n in (2, 3, 5)]
    out = reference.multi_kv_attention(q, segs)
    k, v = torch.cat([s[0] for s in segs], 2), torch.cat([s[1] for s in segs], 2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- neighborhood


def unfold_na(q, k, v, ks, rpb, scale):
    """The F.pad(0) + F.unfold formulation: zero border (written as a BEV user would)."""
    B, H, X, Y, D = q.shape
    r = ks // 2
    kk = k.permute(0, 1, 4, 2, 3).reshape(B * H, D, X, Y)
    vv = v.permute(0, 1, 4, 2, 3).reshape(B * H, D, X, Y)
    ku = F.unfold(kk, ks, padding=r).view(B, H, D, ks * ks, X * Y)  # [B, H, D, ks*ks, XY]
    vu = F.unfold(vv, ks, padding=r).view(B, H, D, ks * ks, X * Y)
    qq = q.permute(0, 1, 4, 2, 3).reshape(B, H, D, 1, X * Y)
    logits = (qq * ku).sum(2) * scale  # [B, H, ks*ks, XY]
    if rpb is not None:
        # window offset (a - r, b - r) -> rpb index (a - r + ks - 1, b - r + ks - 1)
        sub = rpb[:, r : r + ks, r : r + ks].reshape(H, ks * ks, 1)
        logits = logits + sub
    p = logits.softmax(2)
    out = (p.unsqueeze(2) * vu).sum(3)  # [B, H, D, XY]
    return out.view(B, H, D, X, Y).permute(0, 1, 3, 4, 2)


def brute_na(q, k, v, ks, border, rpb, scale):
    """One query at a time, straight from the definition in docs/contract.md."""
    B, H, X, Y, D = q.shape
    r = ks // 2
    out = torch.zeros_like(q)
    for i, j in itertools.product(range(X), range(Y)):
        if border == "clamp":
            i0, j0 = min(max(i - r, 0), X - ks), min(max(j - r, 0), Y - ks)
        else:
            i0, j0 = i - r, j - r
        keys = [(a, b) for a in range(i0, i0 + ks) for b in range(j0, j0 + ks)]
        if border == "mask":
            keys = [(a, b) for a, b in keys if 0 <= a < X and 0 <= b < Y]
        logits, vals = [], []
        for a, b in keys:
            inside = 0 <= a < X and 0 <= b < Y
            kv = k[:, :, a, b] if inside else torch.zeros_like(k[:, :, 0, 0])
            vals.append(v[:, :, a, b] if inside else torch.zeros_like(v[:, :, 0, 0]))
            lg = (q[:, :, i, j] * kv).sum(-1) * scale  # [B, H]
            if rpb is not None:
                lg = lg + rpb[:, a - i + ks - 1, b - j + ks - 1]
            logits.append(lg)
        p = torch.stack(logits, -1).softmax(-1)  # [B, H, n]
        out[:, :, i, j] = (p.unsqueeze(-1) * torch.stack(vals, 2)).sum(2)
    return out


@pytest.mark.parametrize("X,Y,ks", [(5, 4, 3), (9, 13, 5), (3, 2, 7), (6, 7, 7)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_rpb", [False, True], ids=["norpb", "rpb"])
def test_na_zero_matches_unfold(X, Y, ks, with_rpb):
    torch.manual_seed(2)
    q, k, v = rand(2, 2, X, Y, 8), rand(2, 2, X, Y, 8), rand(2, 2, X, Y, 8)
    rpb = rand(2, 2 * ks - 1, 2 * ks - 1) if with_rpb else None
    got = reference.neighborhood_attention2d(q, k, v, kernel_size=ks, border="zero", rpb=rpb, scale=0.7)
    torch.testing.assert_close(got, unfold_na(q, k, v, ks, rpb, 0.7), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("border", ["mask", "clamp", "zero"])
@pytest.mark.parametrize("X,Y,ks", [(5, 4, 3), (7, 9, 5), (3, 2, 5)], ids=lambda v: str(v))
def test_na_matches_brute_force(border, X, Y, ks):
    if border == "clamp" and (X < ks or Y < ks):
        pytest.skip("clamp needs a map at least as large as the window")
    torch.manual_seed(3)
    q, k, v = rand(1, 2, X, Y, 4), rand(1, 2, X, Y, 4), rand(1, 2, X, Y, 4)
    rpb = rand(2, 2 * ks - 1, 2 * ks - 1)
    got, lse = reference.neighborhood_attention2d(
        q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=0.5, return_lse=True
    )
    torch.testing.assert_close(got, brute_na(q, k, v, ks, border, rpb, 0.5), atol=1e-12, rtol=1e-12)
    assert lse.shape == (1, 2, X, Y) and torch.isfinite(lse).all()


def test_na_clamp_window_has_kernel_squared_real_pixels():
    # With v = one-hot of each pixel, the output's support counts the window's real pixels.
    X, Y, ks = 6, 5, 3
    q = torch.zeros(1, 1, X, Y, X * Y, dtype=DT)
    k = torch.zeros_like(q)
    v = torch.eye(X * Y, dtype=DT).view(1, 1, X, Y, X * Y)
    out = reference.neighborhood_attention2d(q, k, v, kernel_size=ks, border="clamp")
    assert ((out > 0).sum(-1) == ks * ks).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, X, Y, dtype=DT))


# ----------------------------------------------------------------------------- rollout


@pytest.mark.parametrize("L,N,residual", [(1, 5, 0.5), (3, 17, 0.5), (2, 9, 0.25)], ids=lambda v: str(v))
def test_rollout_matches_explicit_product(L, N, residual):
    torch.manual_seed(4)
    B, H, D = 2, 3, 8
    qs = [rand(B, H, N, D) for _ in range(L)]
    ks = [rand(B, H, N, D) for _ in range(L)]
    got = reference.attention_rollout(qs, ks, residual=residual)
    scale = D**-0.5
    for b in range(B):
        prod = torch.eye(N, dtype=DT)
        for q, k in zip(qs, ks):  # S_1 first: prod = S_l @ prod
            A = sum(torch.softmax(q[b, h] @ k[b, h].T * scale, -1) for h in range(H)) / H
            prod = ((1 - residual) * A + residual * torch.eye(N, dtype=DT)) @ prod
        torch.testing.assert_close(got[b], prod[0], atol=1e-12, rtol=1e-12)
    # with the blocks' logsumexps given, the same result
    lses = [torch.logsumexp(q @ k.transpose(-1, -2) * scale, -1) for q, k in zip(qs, ks)]
    torch.testing.assert_close(
        reference.attention_rollout(qs, ks, lses=lses, residual=residual), got, atol=1e-12, rtol=1e-12
    )
    assert math.isclose(float(got.sum(-1)[0]), 1.0, rel_tol=1e-12)  # rows of S stay stochastic


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_multi_kv():
    torch.manual_seed(5)
    args = [rand(1, 2, 3, 4, requires_grad=True)] + [rand(1, 2, n, 4, requires_grad=True) for n in (2, 2, 3, 3)]

    def f(q, k1, v1, k2, v2):
        out, lse = reference.pwca_attention(q, k1, v1, k2, v2, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
def test_gradcheck_na_with_rpb(border):
    torch.manual_seed(6)
    q, k, v = (rand(1, 2, 4, 3, 4, requires_grad=True) for _ in range(3))
    rpb = rand(2, 5, 5, requires_grad=True)
    f = lambda q, k, v, rpb: reference.neighborhood_attention2d(q, k, v, kernel_size=3, border=border, rpb=rpb)  # noqa
    assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_rollout_has_no_grad_and_is_fp32():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    out = reference.attention_rollout([q], [q])
    assert out.dtype == torch.float32 and not out.requires_grad
