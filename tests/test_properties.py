"""Property-based tests: every op on every CPU backend (cpp, sdpa, reference) against oracles written
here, independently of ``dcal.ops.reference`` (fp64, explicit loops over window offsets, the
FlashAttention backward formulas written out), over generated shapes (empty ones included),
layouts (contiguous, heads-last, channels-first views, packed-qkv slices, stride-0 expands), dtypes,
borders, dilations, kernel sizes and NaN/inf placements.

Each case checks: values (to a tolerance of the dtype), the non-finite pattern (exactly where the
oracle's is), and the strides of the output and of every gradient (the layout rule: dense, in the
dim order of the input they belong to; docs/inputs.md).

Hypothesis runs derandomized (a fixed seed: the same cases on every run and machine) with a fixed
example budget per test (1,150 cases in all), no example database and no deadline; the whole
file takes about 25 s on 2 idle cores (under 2 minutes on a loaded machine).
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dcal.ops as ops  # noqa: E402
from dcal import _ext  # noqa: E402

settings.register_profile(
    "dcal-properties",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("dcal-properties")

CPU_MKV = ["reference", "sdpa"] + (["cpp"] if _ext.HAS_EXTENSION else [])
CPU_NA = ["reference"] + (["cpp"] if _ext.HAS_EXTENSION else [])
CPU_ROLLOUT = ["reference"] + (["cpp"] if _ext.HAS_EXTENSION else [])
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
POISONS = (float("nan"), float("inf"), float("-inf"))


def _takes(op, backend, dtype):
    """The CPU dtypes a backend takes (an explicit backend that cannot run raises: tested elsewhere):
    sdpa has no float16 on CPU; the C++ multi_kv kernel no bfloat16 (the chain gives it to sdpa)."""
    if op == "mkv" and backend == "cpp":
        return dtype != torch.bfloat16
    return not (backend == "sdpa" and dtype == torch.float16)


# ----------------------------------------------------------------------------- the layout rule


def rule_strides(t):
    """Dense strides with t's dims in memory by decreasing stride, ties in logical order, stride-0
    dims outermost (written out here, not imported from the package)."""
    dims = list(range(t.dim()))
    order = sorted(dims, key=lambda d: (0 if t.stride(d) == 0 else 1, -t.stride(d), d))
    strides, acc = [0] * t.dim(), 1
    for d in reversed(order):
        strides[d] = acc
        acc *= max(t.shape[d], 1)
    return tuple(strides)


def assert_layout(got, like, what):
    assert got.shape == like.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(like.shape)}"
    assert got.stride() == rule_strides(like), (
        f"{what}: strides {got.stride()}, expected {rule_strides(like)} (the dim order of {tuple(like.stride())})"
    )


def assert_matches(got, want, tol, what):
    """Non-finite exactly where the oracle is, equal to tol elsewhere."""
    got = got.detach().double()
    bad_w, bad_g = ~torch.isfinite(want), ~torch.isfinite(got)
    assert torch.equal(bad_w, bad_g), (
        f"{what}: non-finite at {bad_g.nonzero().tolist()[:6]}, oracle at {bad_w.nonzero().tolist()[:6]}"
    )
    if (~bad_w).any():
        torch.testing.assert_close(got[~bad_w], want[~bad_w], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- inputs


def kernel_scale(scale, D, dtype):
    """The scale as the kernels apply it: D ** -0.5 by default; in float32 for every dtype but
    float64 (docs/inputs.md), so a tiny scale is 0 there (and then q and k are not read)."""
    sc = D**-0.5 if scale is None else scale
    if dtype != torch.float64:
        sc = float(torch.tensor(sc, dtype=torch.float32))
    return sc


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def make_views(layout, shape, n, seed, dtype, poison=None):
    """``n`` tensors of logical ``shape`` (tokens or the map in the middle, D last) laid out as
    ``layout``, each a non-leaf view of a leaf that needs a gradient; ``poison`` = (which, flat
    position, value) written into the source before viewing. Returns (leaves, views, fp64 copies
    of the views as the oracle reads them)."""
    B, H, *mid, D = shape
    nm = len(mid)
    if layout == "contiguous":
        srcs = [_rand(shape, seed + i) for i in range(n)]
        to_view = [lambda s: s for _ in range(n)]
    elif layout == "heads_last":  # [B, *mid, H, D]
        srcs = [_rand((B, *mid, H, D), seed + i) for i in range(n)]
        perm = (0, nm + 1, *range(1, nm + 1), nm + 2)
        to_view = [lambda s, p=perm: s.permute(*p) for _ in range(n)]
    elif layout == "channels_first":  # [B, C, *mid] with C = H * D
        srcs = [_rand((B, H, D, *mid), seed + i) for i in range(n)]
        perm = (0, 1, *range(3, 3 + nm), 2)
        to_view = [lambda s, p=perm: s.permute(*p) for _ in range(n)]
    elif layout == "qkv_slice":  # one [B, *mid, n, H, D] projection
        src = _rand((B, *mid, n, H, D), seed)
        srcs = [src]
        perm = (0, nm + 1, *range(1, nm + 1), nm + 2)
        to_view = [lambda s, i=i, p=perm: s.select(nm + 1, i).permute(*p) for i in range(n)]
    elif layout == "expand_batch":  # stride 0 over the batch
        srcs = [_rand((1, H, *mid, D), seed + i) for i in range(n)]
        to_view = [lambda s: s.expand(B, *s.shape[1:]) for _ in range(n)]
    elif layout == "expand_heads":  # stride 0 over the heads (shared keys, MQA style)
        srcs = [_rand((B, 1, *mid, D), seed + i) for i in range(n)]
        to_view = [lambda s: s.expand(s.shape[0], H, *s.shape[2:]) for _ in range(n)]
    else:
        raise AssertionError(layout)
    if poison is not None:
        which, pos, value = poison
        src = srcs[which % len(srcs)]
        if src.numel():
            src.view(-1)[pos % src.numel()] = value
    leaves = [s.to(dtype).requires_grad_() for s in srcs]
    if layout == "qkv_slice":
        views = [f(leaves[0]) for f in to_view]
        exact = [f(srcs[0].to(dtype).double()) for f in to_view]
    else:
        views = [f(x) for f, x in zip(to_view, leaves)]
        exact = [f(s.to(dtype).double()) for f, s in zip(to_view, srcs)]
    return leaves, views, exact


def sizes(hi):
    """A dim size in [0, hi], 0 about one time in eight (the empty result)."""
    return st.one_of(
        st.integers(1, hi),
        st.integers(1, hi),
        st.integers(1, hi),
        st.integers(1, hi),
        st.integers(1, hi),
        st.integers(1, hi),
        st.integers(1, hi),
        st.just(0),
    )


LAYOUTS = ("contiguous", "heads_last", "channels_first", "qkv_slice", "expand_batch", "expand_heads")
poisons = st.one_of(
    st.none(), st.none(), st.none(), st.tuples(st.integers(0, 5), st.integers(0, 10_000), st.sampled_from(POISONS))
)


# ----------------------------------------------------------------------------- oracles (fp64)


def _softmax(s):
    """Row softmax as PyTorch computes it: max, exp of the difference, normalise (a row holding
    +inf, or only -inf, or a NaN is NaN)."""
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - m)
    return e / e.sum(dim=-1, keepdim=True)


def oracle_mkv(q, ks, vs, scale, dout):
    """out, lse and (dq, dks, dvs) of softmax(q K^T scale) V over the concatenated segments."""
    K, Vv = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    if scale == 0:  # the documented rule: logits are 0, q and k are not read
        q, K = torch.zeros_like(q), torch.zeros_like(K)
    s = torch.einsum("bhqd,bhkd->bhqk", q, K) * scale
    p = _softmax(s)
    out = torch.einsum("bhqk,bhkd->bhqd", p, Vv)
    lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else s.sum(-1)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, dout)
    dp = torch.einsum("bhqd,bhkd->bhqk", dout, Vv)
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, K) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    if scale == 0:  # the documented rule: q and k are not read, their gradients are zero (even where dS is not finite)
        dq, dk = torch.zeros_like(dq), torch.zeros_like(dk)
    sizes = [k.shape[2] for k in ks]
    return out, lse, dq, list(dk.split(sizes, dim=2)), list(dv.split(sizes, dim=2))


def _axis_windows(n, ks, border, dil):
    """Per query position i in [0, n): the ks key positions of its window and whether each is on
    the map. zero/mask: centred, ``i + dil * (u - ks // 2)``. clamp: the query's sub-grid (i mod
    dil) holds ``ceil((n - g) / dil)`` positions; its window of ks consecutive sub-grid positions
    starts at ``i // dil - ks // 2`` clamped into the sub-grid."""
    r = ks // 2
    pos, valid = [], []
    for i in range(n):
        if border == "clamp":
            g = i % dil
            m = (n - g + dil - 1) // dil
            start = min(max(i // dil - r, 0), m - ks)
            row = [g + dil * (start + u) for u in range(ks)]
        else:
            row = [i + dil * (u - r) for u in range(ks)]
        pos.append(row)
        valid.append([0 <= x < n for x in row])
    return pos, valid


def oracle_na2d(q, k, v, rpb, ks, border, dil, scale, dout):
    """out, dq, dk, dv, drpb of 2-D neighborhood attention by a loop over the ks x ks window
    offsets (each offset vectorised over the map)."""
    B, H, X, Y, D = q.shape
    if scale == 0:  # the documented rule: logits are 0 (+ rpb), q and k are not read
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    pr, vr = _axis_windows(X, ks, border, dil)
    pc, vc = _axis_windows(Y, ks, border, dil)
    ii, jj = torch.arange(X), torch.arange(Y)
    logits, kw, vw, idx = [], [], [], []
    for u in range(ks):
        rows = torch.tensor([pr[i][u] for i in range(X)], dtype=torch.long)
        rok = torch.tensor([vr[i][u] for i in range(X)], dtype=torch.bool)
        for w in range(ks):
            cols = torch.tensor([pc[j][w] for j in range(Y)], dtype=torch.long)
            cok = torch.tensor([vc[j][w] for j in range(Y)], dtype=torch.bool)
            ok = rok[:, None] & cok[None, :]  # [X, Y]
            ri, ci = rows.clamp(0, max(X - 1, 0)), cols.clamp(0, max(Y - 1, 0))
            kk = torch.where(ok[..., None], k[:, :, ri][:, :, :, ci], torch.zeros(()).double())
            vv = torch.where(ok[..., None], v[:, :, ri][:, :, :, ci], torch.zeros(()).double())
            lg = (q * kk).sum(-1) * scale  # [B, H, X, Y]; an off-map key is a zero vector ("zero")
            di = (rows - ii) // dil + ks - 1
            dj = (cols - jj) // dil + ks - 1
            if rpb is not None:
                lg = lg + rpb[:, di[:, None], dj[None, :]][None]
            if border == "mask":
                lg = torch.where(ok, lg, torch.tensor(float("-inf")).double())
            logits.append(lg)
            kw.append(kk)
            vw.append(vv)
            idx.append((ri, ci, ok, di, dj))
    s = torch.stack(logits, -1)  # [B, H, X, Y, ks*ks]
    p = _softmax(s)
    out = sum(p[..., n, None] * vw[n] for n in range(len(vw)))
    delta = (dout * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    drpb = torch.zeros_like(rpb) if rpb is not None else None
    for n, (ri, ci, ok, di, dj) in enumerate(idx):
        keep = ok if border != "zero" else torch.ones_like(ok)  # zero: off-map keys are in the softmax
        ds = p[..., n] * ((dout * vw[n]).sum(-1) - delta)  # [B, H, X, Y]
        ds = torch.where(keep, ds, torch.zeros(()).double())
        dq = dq + ds[..., None] * kw[n] * scale
        if drpb is not None:
            contrib = ds.sum(0)  # [H, X, Y]
            for i in range(X):
                for j in range(Y):
                    if keep[i, j]:
                        drpb[:, di[i], dj[j]] += contrib[:, i, j]
        # scatter to the on-map key positions (clamp windows overlap: accumulate)
        gi = ri[:, None].expand(X, Y)[ok]
        gj = ci[None, :].expand(X, Y)[ok]
        dk.permute(2, 3, 0, 1, 4).index_put_(
            (gi, gj), (ds[..., None] * q * scale)[:, :, ok].permute(2, 0, 1, 3), accumulate=True
        )
        dv.permute(2, 3, 0, 1, 4).index_put_(
            (gi, gj), (p[..., n, None] * dout)[:, :, ok].permute(2, 0, 1, 3), accumulate=True
        )
    if scale == 0:  # the documented rule: q and k are not read, their gradients are zero (even where dS is not finite)
        dq, dk = torch.zeros_like(dq), torch.zeros_like(dk)
    return out, dq, dk, dv, drpb


def oracle_rollout(qs, ks, lses, scale, residual):
    """Row 0 of S_L ... S_1, S_l = (1 - residual) mean_h softmax(q k^T scale) + residual I: the
    CLS row of the last block, multiplied through the blocks below it (the other rows of S_L
    are never read, so a NaN there does not reach the result)."""
    B, H, N, _ = qs[0].shape
    if N == 0:
        return torch.zeros(B, N, dtype=torch.float64)
    if scale == 0:  # the documented rule: logits are 0, q and k are not read
        qs, ks = [torch.zeros_like(t) for t in qs], [torch.zeros_like(t) for t in ks]
    row = None
    for l in reversed(range(len(qs))):
        s = torch.einsum("bhqd,bhkd->bhqk", qs[l], ks[l]) * scale
        a = torch.exp(s - lses[l][..., None]) if lses is not None else _softmax(s)
        S = (1 - residual) * a.mean(1) + residual * torch.eye(N, dtype=torch.float64)
        row = S[:, 0, :] if row is None else torch.einsum("bi,bij->bj", row, S)
    return row


# ----------------------------------------------------------------------------- properties


@settings(PROFILE, max_examples=500)
@given(
    B=sizes(2),
    H=sizes(3),
    Nq=sizes(9),
    Nks=st.lists(sizes(12), min_size=1, max_size=3),
    D=st.sampled_from([1, 2, 3, 8, 16, 17, 40, 72, 136]),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(list(DTYPES)),
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0)),
    poison=poisons,
    seed=st.integers(0, 2**16),
)
def test_multi_kv_attention_matches_oracle(B, H, Nq, Nks, D, layout, dtype, scale, poison, seed):
    dt = DTYPES[dtype]
    if sum(Nks) == 0:
        Nks = Nks[:-1] + [1]  # no key at all is refused (tests/test_inputs.py)
    if D > 40 and dt != torch.float64:
        D = 40  # keep the low-precision cases' error small enough to compare
    qleaves, (q,), (q64,) = make_views(
        layout, (B, H, Nq, D), 1, seed, dt, poison if poison and poison[0] == 0 else None
    )
    segs, segs64, leaves = [], [], list(qleaves)
    for i, nk in enumerate(Nks):
        p = (poison[0] - 1, poison[1], poison[2]) if poison and poison[0] in (2 * i + 1, 2 * i + 2) else None
        lv, (k, v), (k64, v64) = make_views(layout, (B, H, nk, D), 2, seed + 7 * (i + 1), dt, p)
        segs.append((k, v))
        segs64.append((k64, v64))
        leaves += lv
    sc = kernel_scale(scale, D, dt)
    dout64 = _rand((B, H, Nq, D), seed + 99).to(dt).double()
    want = oracle_mkv(q64, [k for k, _ in segs64], [v for _, v in segs64], sc, dout64)
    tol = TOL[dt] * max(1.0, abs(sc) * math.sqrt(D) / 2)
    for backend in CPU_MKV:
        if not _takes("mkv", backend, dt):
            continue
        out, lse = ops.multi_kv_attention(q, segs, scale=scale, return_lse=True, backend=backend)
        what = f"{backend} {dtype} {layout} B{B} H{H} Nq{Nq} Nk{Nks} D{D}"
        assert out.dtype == dt and lse.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        assert_layout(out, q, f"{what} out")
        assert lse.shape == (B, H, Nq) and lse.is_contiguous()
        assert_matches(out, want[0], tol, f"{what} out")
        if poison is None:
            assert_matches(lse, want[1], tol, f"{what} lse")
        tensors = [q] + [t for kv in segs for t in kv]
        grads = torch.autograd.grad(out, tensors, dout64.to(dt), allow_unused=False)
        wants = [want[2]] + [g for pair in zip(want[3], want[4]) for g in pair]
        names = ["dq"] + [f"d{n}{i}" for i in range(len(segs)) for n in ("k", "v")]
        for name, g, w, t in zip(names, grads, wants, tensors):
            assert g.dtype == dt
            assert_layout(g, t, f"{what} {name}")
            assert_matches(g, w, 4 * tol, f"{what} {name}")


@settings(PROFILE, max_examples=400)
@given(
    B=sizes(2),
    H=sizes(2),
    X=sizes(8),
    Y=sizes(9),
    D=st.sampled_from([1, 3, 8, 16, 24]),
    ks=st.sampled_from([3, 5, 7]),
    dil=st.sampled_from([1, 1, 2, 3]),
    border=st.sampled_from(["zero", "mask", "clamp"]),
    use_rpb=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(list(DTYPES)),
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0)),
    poison=poisons,
    seed=st.integers(0, 2**16),
)
def test_neighborhood_attention2d_matches_oracle(
    B, H, X, Y, D, ks, dil, border, use_rpb, layout, dtype, scale, poison, seed
):
    dt = DTYPES[dtype]
    if border == "clamp" and X * Y > 0:  # clamp needs the map to hold a whole dilated window
        X, Y = max(X, ks * dil), max(Y, ks * dil)
        X, Y = min(X, ks * dil + 2), min(Y, ks * dil + 3)
    p_qkv = poison if poison and poison[0] < 3 else None
    leaves, (q, k, v), (q64, k64, v64) = make_views(layout, (B, H, X, Y, D), 3, seed, dt, p_qkv)
    rpb = rpb64 = None
    if use_rpb:
        src = _rand((H, 2 * ks - 1, 2 * ks - 1), seed + 5)
        if poison and poison[0] >= 3 and src.numel():
            src.view(-1)[poison[1] % src.numel()] = poison[2]
        rpb = src.to(dt).requires_grad_()
        rpb64 = rpb.detach().double()
    sc = kernel_scale(scale, D, dt)
    dout64 = _rand((B, H, X, Y, D), seed + 99).to(dt).double()
    want = oracle_na2d(q64, k64, v64, rpb64, ks, border, dil, sc, dout64)
    tol = TOL[dt] * max(1.0, abs(sc) * math.sqrt(D) / 2)
    for backend in CPU_NA:
        out = ops.neighborhood_attention2d(
            q, k, v, kernel_size=ks, border=border, rpb=rpb, scale=scale, dilation=dil, backend=backend
        )
        what = f"{backend} {dtype} {layout} {border} ks{ks} dil{dil} B{B} H{H} {X}x{Y} D{D} rpb={use_rpb}"
        assert out.dtype == dt
        assert_layout(out, q, f"{what} out")
        assert_matches(out, want[0], tol, f"{what} out")
        tensors = [q, k, v] + ([rpb] if use_rpb else [])
        grads = torch.autograd.grad(out, tensors, dout64.to(dt))
        for name, g, w, t in zip(("dq", "dk", "dv", "drpb"), grads, want[1:], tensors):
            assert g.dtype == dt
            if name == "drpb":
                assert g.shape == t.shape and g.is_contiguous(), f"{what} drpb strides {g.stride()}"
            else:
                assert_layout(g, t, f"{what} {name}")
            # drpb sums over the whole map: its rounding error grows with the map
            gt = 4 * tol * (max(1.0, math.sqrt(B * X * Y)) if name == "drpb" else 1.0)
            assert_matches(g, w, gt, f"{what} {name}")


@settings(PROFILE, max_examples=250)
@given(
    B=sizes(2),
    H=st.integers(1, 3),
    N=sizes(10),
    D=st.sampled_from([1, 4, 16, 33]),
    L=st.integers(1, 3),
    with_lse=st.booleans(),
    residual=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(list(DTYPES)),
    scale=st.one_of(st.none(), st.floats(-1.0, 1.0)),
    poison=poisons,
    seed=st.integers(0, 2**16),
)
def test_attention_rollout_matches_oracle(B, H, N, D, L, with_lse, residual, layout, dtype, scale, poison, seed):
    dt = DTYPES[dtype]
    qs, ks, qs64, ks64 = [], [], [], []
    for l in range(L):
        p = poison if poison and poison[0] % L == l else None
        _, (q, k), (q64, k64) = make_views(layout, (B, H, N, D), 2, seed + 3 * l, dt, p)
        qs.append(q.detach())
        ks.append(k.detach())
        qs64.append(q64)
        ks64.append(k64)
    sc = kernel_scale(scale, D, dt)
    lses = lses64 = None
    if with_lse:
        lses64 = [
            torch.logsumexp(torch.einsum("bhqd,bhkd->bhqk", a, b) * sc, -1) if N else a.sum(-1)
            for a, b in zip(qs64, ks64)
        ]
        lses = [x.float() for x in lses64]
        lses64 = [x.float().double() for x in lses64]
    want = oracle_rollout(qs64, ks64, lses64, sc, residual)
    tol = TOL[dt] * max(1.0, abs(sc) * math.sqrt(D) / 2) * L
    for backend in CPU_ROLLOUT:
        got = ops.attention_rollout(qs, ks, scale=scale, lses=lses, residual=residual, backend=backend)
        what = f"{backend} {dtype} {layout} B{B} H{H} N{N} D{D} L{L} lse={with_lse}"
        assert got.shape == (B, N) and got.is_contiguous()
        assert got.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        if poison is None:
            assert_matches(got, want, tol, what)
        else:
            # a non-finite score row spreads through the products of the whole chain; the rule is the
            # pattern, which depends on the order of the products: both must be non-finite where
            # the oracle's row is, and equal where both are finite
            bad = ~torch.isfinite(want)
            assert bool((~torch.isfinite(got) | ~bad).all()), f"{what}: finite where the oracle is not"
            ok = torch.isfinite(got) & ~bad
            torch.testing.assert_close(got[ok].double(), want[ok], atol=tol, rtol=tol)
