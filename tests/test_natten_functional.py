"""dcal.ops.na2d against natten.functional.na2d (0.21, forward on CPU), its heads-last layout
(no copy in or out), the rpb NATTEN's fused kernels lack (against a plain windowed loop written
here), gradients, refusals; neighborhood_attention2d's layout= keyword; and the module's NATTEN
constructor / strict-load behaviour."""

import warnings

import pytest
import torch

import dcal.ops as ops
from dcal.nn import NeighborhoodAttention2D

natten = pytest.importorskip("natten")

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]  # NATTEN on CPU


def _natten_na2d(q, k, v, ks, dil=1, scale=None):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return natten.functional.na2d(q, k, v, ks, dilation=dil, scale=scale)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the NATTEN build
            pytest.skip(f"NATTEN cannot run on CPU here: {e}")


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


CASES = [  # B, X, Y, H, D, kernel_size, dilation
    (1, 9, 11, 2, 16, 3, 1),
    (2, 13, 10, 3, 32, 5, 2),
    (1, 7, 7, 1, 8, 7, 1),  # window = map
    (1, 11, 17, 2, 32, 3, 3),  # odd sizes, not multiples of the dilation
    (2, 15, 9, 4, 16, 7, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}x{}x{}h{}d{}k{}dil{}".format(*c))
def test_na2d_equals_natten(case):
    B, X, Y, H, D, ks, dil = case
    q, k, v = (_rand(B, X, Y, H, D, seed=s) for s in range(3))
    want = _natten_na2d(q, k, v, ks, dil)
    got = ops.na2d(q, k, v, ks, dilation=dil)
    assert got.shape == (B, X, Y, H, D)
    assert got.is_contiguous(), "heads-last in, dense heads-last out"
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    # NATTEN's per-axis pairs and an explicit scale
    got2 = ops.na2d(q, k, v, (ks, ks), dilation=(dil, dil), is_causal=(False, False), scale=0.3)
    torch.testing.assert_close(got2, _natten_na2d(q, k, v, ks, dil, scale=0.3), atol=2e-6, rtol=2e-6)


def test_na2d_reads_views_in_place_and_returns_heads_last(monkeypatch):
    """Slices of a fused heads-last qkv projection reach the backend as views (no copy) and the
    output is dense heads-last; the result equals NATTEN on the same (copied) tensors."""
    B, X, Y, H, D, ks = 2, 9, 10, 2, 16, 3
    qkv = _rand(B, X, Y, 3, H, D, seed=5)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    seen = []
    real = ops.choose

    def spy(call, backend):
        name, fn = real(call, backend)

        def wrapped(q_, k_, v_, *a):
            seen.append((q_, k_, v_))
            return fn(q_, k_, v_, *a)

        return name, wrapped

    monkeypatch.setattr(ops, "choose", spy)
    out = ops.na2d(q, k, v, ks)
    ((q_, k_, v_),) = seen
    for t, src in ((q_, q), (k_, k), (v_, v)):
        assert t.shape == (B, H, X, Y, D)
        assert t.data_ptr() == src.data_ptr() and t.stride() == src.permute(0, 3, 1, 2, 4).stride(), "a view"
    assert out.shape == (B, X, Y, H, D) and out.is_contiguous()
    want = _natten_na2d(q.contiguous(), k.contiguous(), v.contiguous(), ks)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


# ----------------------------------------------------------------------------- rpb (NATTEN <= 0.17)


def _clamp_starts(n, ks, dil):
    """NATTEN's dilated clamp window: positions of the window of each index along one axis."""
    r = ks // 2
    res = []
    for i in range(n):
        g, ii = i % dil, i // dil
        ng = (n - g + dil - 1) // dil
        s = min(max(ii - r, 0), ng - ks)
        res.append([g + dil * (s + u) for u in range(ks)])
    return res


def _windowed(q, k, v, ks, dil, rpb, scale):
    """Plain loop over queries, heads-last [B, X, Y, H, D]; rpb [H, 2k-1, 2k-1] at (key-query)/dil."""
    B, X, Y, H, D = q.shape
    wx, wy = _clamp_starts(X, ks, dil), _clamp_starts(Y, ks, dil)
    out = torch.empty_like(q)
    for i in range(X):
        for j in range(Y):
            ix = torch.tensor(wx[i])[:, None].expand(ks, ks).reshape(-1)
            iy = torch.tensor(wy[j])[None, :].expand(ks, ks).reshape(-1)
            kk, vv = k[:, ix, iy], v[:, ix, iy]  # [B, k*k, H, D]
            logit = torch.einsum("bhd,bnhd->bhn", q[:, i, j], kk) * scale
            if rpb is not None:
                logit = logit + rpb[:, (ix - i) // dil + ks - 1, (iy - j) // dil + ks - 1]
            out[:, i, j] = torch.einsum("bhn,bnhd->bhd", logit.softmax(-1), vv)
    return out


@pytest.mark.parametrize("ks,dil", [(3, 1), (3, 2), (5, 1)])
def test_na2d_rpb_forward_and_gradients_equal_a_windowed_loop(ks, dil):
    B, X, Y, H, D = 1, 2 * ks * dil - 1, ks * dil + 2, 2, 8
    q, k, v = (_rand(B, X, Y, H, D, seed=s, dtype=torch.float64).requires_grad_() for s in range(3))
    rpb = _rand(H, 2 * ks - 1, 2 * ks - 1, seed=9, dtype=torch.float64).requires_grad_()
    g = _rand(B, X, Y, H, D, seed=10, dtype=torch.float64)
    got = ops.na2d(q, k, v, ks, dilation=dil, rpb=rpb, scale=0.4)
    want = _windowed(q, k, v, ks, dil, rpb, 0.4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    ga = torch.autograd.grad(got, (q, k, v, rpb), g)
    gb = torch.autograd.grad(want, (q, k, v, rpb), g)
    for a, b, n in zip(ga, gb, "q k v rpb".split()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"grad {n}: {m}")
    # no rpb: the loop agrees with NATTEN itself, so the loop's window rule is NATTEN's
    with torch.no_grad():
        q32, k32, v32 = (t.float() for t in (q, k, v))
        torch.testing.assert_close(
            _windowed(q32, k32, v32, ks, dil, None, D**-0.5), _natten_na2d(q32, k32, v32, ks, dil), atol=2e-6, rtol=2e-6
        )


# ----------------------------------------------------------------------------- refusals

T = _rand(1, 9, 9, 2, 16)
REFUSALS = [
    ("is_causal", lambda: ops.na2d(T, T, T, 3, is_causal=True), ValueError),
    ("is_causal", lambda: ops.na2d(T, T, T, 3, is_causal=(True, False)), ValueError),
    ("stride", lambda: ops.na2d(T, T, T, 3, stride=2), ValueError),
    ("kernel_size", lambda: ops.na2d(T, T, T, (3, 5)), ValueError),
    ("dilation", lambda: ops.na2d(T, T, T, 3, dilation=(1, 2)), ValueError),
    ("kernel_size", lambda: ops.na2d(T, T, T, 4), ValueError),
    ("query", lambda: ops.na2d(T[0], T, T, 3), ValueError),
    ("key.*heads differ", lambda: ops.na2d(T, T[:, :, :, :1], T, 3), ValueError),
    ("value.*head dims differ", lambda: ops.na2d(T, T, T[..., :8], 3), ValueError),
    ("kernel_size\\*dilation", lambda: ops.na2d(T, T, T, 5, dilation=2), ValueError),
    ("rpb", lambda: ops.na2d(T, T, T, 3, rpb=torch.zeros(3, 5, 5)), ValueError),
    ("positional", lambda: ops.na2d(T, T, T, 3, 1), TypeError),  # NATTEN's 5th positional is stride
    ("layout", lambda: ops.neighborhood_attention2d(T, T, T, kernel_size=3, layout="nhwc"), ValueError),
]


@pytest.mark.parametrize("match,call,exc", REFUSALS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(REFUSALS)])
def test_na2d_refusals_name_the_argument(match, call, exc):
    with pytest.raises(exc, match=match if match != "positional" else None):
        call()


# ----------------------------------------------------------------------------- layout=


def test_layout_heads_last_equals_heads_first_on_permuted_tensors():
    B, X, Y, H, D, ks = 2, 8, 11, 3, 16, 5
    q, k, v = (_rand(B, X, Y, H, D, seed=s) for s in range(3))
    rpb = _rand(H, 2 * ks - 1, 2 * ks - 1, seed=4)
    for border in ("zero", "mask", "clamp"):
        last = ops.neighborhood_attention2d(q, k, v, kernel_size=ks, border=border, rpb=rpb, layout="heads_last")
        first = ops.neighborhood_attention2d(
            *(t.permute(0, 3, 1, 2, 4).contiguous() for t in (q, k, v)),
            kernel_size=ks,
            border=border,
            rpb=rpb,
            layout="heads_first",
        )
        assert last.shape == (B, X, Y, H, D) and last.is_contiguous()
        torch.testing.assert_close(last, first.permute(0, 2, 3, 1, 4), atol=0, rtol=0)


def test_heads_last_tensors_read_as_heads_first_warn():
    """The shape of the reported mistake: heads-last [1, 16, 16, 4, 32] read as heads-first has a
    map 4 wide (the heads) under a 7-wide window while '16 heads' would fit one."""
    q = _rand(1, 16, 16, 4, 32)
    with pytest.warns(UserWarning, match="layout='heads_last'"):
        ops.neighborhood_attention2d(q, q, q, kernel_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.neighborhood_attention2d(q, q, q, kernel_size=7, layout="heads_first")  # explicit: silent
        ops.neighborhood_attention2d(q, q, q, kernel_size=7, layout="heads_last")
        ops.neighborhood_attention2d(
            q.permute(0, 3, 1, 2, 4), q.permute(0, 3, 1, 2, 4), q.permute(0, 3, 1, 2, 4), kernel_size=7
        )  # real heads-first: 4 heads on 16x16, no warning
    with pytest.raises(ValueError, match="kernel_size\\*dilation"):  # clamp refuses the 4-wide "map"
        ops.neighborhood_attention2d(q, q, q, kernel_size=7, border="clamp", layout="heads_first")


# ----------------------------------------------------------------------------- the module


def _natten_module(C, H, ks, dil=1):
    torch.manual_seed(0)
    m = natten.NeighborhoodAttention2D(embed_dim=C, num_heads=H, kernel_size=ks, dilation=dil)
    with torch.no_grad():
        m.qkv.bias.normal_()
        m.proj.bias.normal_()
    return m.eval()


def test_natten_constructor_computes_nattens_function():
    """NATTEN's own constructor call, then its state dict strictly: NATTEN's output (this was a
    0.166 max difference with dcal's zero border and a random rpb after a non-strict load)."""
    C, H, ks = 32, 2, 7
    theirs = _natten_module(C, H, ks)
    ours = NeighborhoodAttention2D(embed_dim=C, num_heads=H, kernel_size=ks)
    assert (ours.border, ours.rpb) == ("clamp", None)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = _rand(2, 9, 12, C, seed=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(x)
        torch.testing.assert_close(ours.eval()(x), want, atol=2e-6, rtol=2e-6)


def test_dcal_signature_strict_load_of_natten_state_dict_says_what_to_do():
    theirs = _natten_module(32, 2, 5)
    ours = NeighborhoodAttention2D(32, 2, 5)  # dcal's defaults: zero border, rpb
    assert (ours.border, ours.rpb is not None) == ("zero", True)
    before = {k: t.clone() for k, t in ours.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    msg = str(e.value)
    assert "rpb" in msg and "from_natten(natten_module)" in msg and 'border="clamp", rel_pos_bias=False' in msg
    for k, t in ours.state_dict().items():  # refused before anything was copied
        assert torch.equal(t, before[k]), k
    with pytest.warns(UserWarning, match="from_natten.*random"):
        ours.load_state_dict(theirs.state_dict(), strict=False)
    # nested in a model (prefixed keys): torch's missing-key error, and the hint as a warning
    wrapper = torch.nn.Sequential(NeighborhoodAttention2D(32, 2, 5))
    with pytest.warns(UserWarning, match=r"'0\.rpb'.*from_natten"), pytest.raises(RuntimeError, match=r"0\.rpb"):
        wrapper.load_state_dict({f"0.{k}": t for k, t in theirs.state_dict().items()})
    # and a dcal state dict with rpb still loads strictly
    NeighborhoodAttention2D(32, 2, 5).load_state_dict(ours.state_dict(), strict=True)


def test_modules_state_their_layout_so_narrow_maps_do_not_warn():
    """A heads-first map narrower than the window with many heads is legitimate (zero border):
    the modules pass their layout, so the shape check stays quiet for them."""
    from dcal.nn import LocalGraphAttention

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalGraphAttention(64, 8, 7)(_rand(1, 64, 9, 4))
        NeighborhoodAttention2D(64, 8, 7)(_rand(1, 9, 4, 64))
