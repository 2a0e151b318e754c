"""Neighborhood-attention modules (dcal.nn) and the BEV graph module (dcal.models).

The modules are checked against the same modules run on the reference backend (fp64), against
the original unfold BEV block (written out below, exact to 1e-10 in fp64) and against NATTEN's
definition (its window and rpb index formulas, written out below; and NATTEN itself when it is
installed). Tests pass whichever backend the chain picks on this machine.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcal.models import BEVGraphModule
from dcal.nn import LocalGraphAttention, NeighborhoodAttention2D, convert_unfold_state_dict
from dcal.testing import judge

# (dtype, atol, rtol) of a module on the default backend vs the same module on the fp64 reference.
TOLS = [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-5, 2e-5)]
# bf16 is judged by the rule of dcal.testing.judging: at most 2x (forward) / 3x (gradients) the
# reference backend's own bf16 error, plus the dtype's floor.


def _id(case):
    return "x".join(str(c) for c in case)


# ----------------------------------------------------------------------------- reference modules


class UnfoldLocalAttention(nn.Module):
    """The original BEV block: 1x1 convs, F.unfold of k and v, softmax over the window, residual."""

    def __init__(self, channels, num_heads, kernel_size):
        super().__init__()
        self.num_heads, self.kernel_size = num_heads, kernel_size
        self.q_conv = nn.Conv2d(channels, channels, 1)
        self.k_conv = nn.Conv2d(channels, channels, 1)
        self.v_conv = nn.Conv2d(channels, channels, 1)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, X, Y = x.shape
        H, ks = self.num_heads, self.kernel_size
        D = C // H
        q = self.q_conv(x).reshape(B, H, D, 1, X * Y)
        k = F.unfold(self.k_conv(x), ks, padding=ks // 2).reshape(B, H, D, ks * ks, X * Y)
        v = F.unfold(self.v_conv(x), ks, padding=ks // 2).reshape(B, H, D, ks * ks, X * Y)
        attn = ((q * k).sum(2, keepdim=True) * D**-0.5).softmax(dim=3)  # [B, H, 1, ks*ks, X*Y]
        out = (attn * v).sum(3).reshape(B, C, X, Y)
        return x + self.out_conv(out)


def _natten_window_start(i, n, ks):
    r = ks // 2
    return max(i - r, 0) + (i + r >= n) * (n - i - r - 1)


def _natten_pb_start(i, n, ks):
    r = ks // 2
    return r + (i < r) * (r - i) + (i + r >= n) * (n - i - 1 - r)


def natten_forward(sd, x, num_heads, ks):
    """NATTEN's NeighborhoodAttention2D (with rpb) from its state dict, pixel by pixel, with
    NATTEN's own window-start and rpb-start formulas."""
    B, X, Y, C = x.shape
    D = C // num_heads
    qkv = F.linear(x, sd["qkv.weight"], sd["qkv.bias"]).reshape(B, X, Y, 3, num_heads, D).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv[0] * D**-0.5, qkv[1], qkv[2]
    out = torch.zeros_like(q)
    for i in range(X):
        si, pi = _natten_window_start(i, X, ks), _natten_pb_start(i, X, ks)
        for j in range(Y):
            sj, pj = _natten_window_start(j, Y, ks), _natten_pb_start(j, Y, ks)
            kw, vw = k[:, :, si : si + ks, sj : sj + ks], v[:, :, si : si + ks, sj : sj + ks]  # [B, H, ks, ks, D]
            logits = torch.einsum("bhd,bhuvd->bhuv", q[:, :, i, j], kw) + sd["rpb"][:, pi : pi + ks, pj : pj + ks]
            p = logits.flatten(2).softmax(-1).view_as(logits)
            out[:, :, i, j] = torch.einsum("bhuv,bhuvd->bhd", p, vw)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, X, Y, C)
    return F.linear(out, sd["proj.weight"], sd["proj.bias"])


# ----------------------------------------------------------------------------- helpers


def _randomise(module, seed):
    """Non-trivial values everywhere (norm affine and biases included), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.5  # weights: 1/sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return module


def _fwd_bwd(module, x, seed=7):
    """Output and gradients (input and every parameter) for a fixed random output gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    y.backward(g)
    res = {"out": y.detach(), "grad x": x.grad}
    res.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return res


def _copy(module, dtype, backend):
    """The same module (same weights) in ``dtype`` on ``backend`` (None: the chain's choice)."""
    m = copy.deepcopy(module).to(dtype)
    for sub in m.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    return m


def _compare(got, want, dtype, atol, rtol):
    bad = []
    for name, w in want.items():
        g = got[name]
        if g is None or w is None:
            if (g is None) != (w is None):
                bad.append(f"{name}: one side has no gradient")
            continue
        if not torch.allclose(g.double(), w.double(), atol=atol, rtol=rtol):
            bad.append(f"{name}: max abs err {(g.double() - w.double()).abs().max().item():.3e} ({dtype})")
    assert not bad, "; ".join(bad)


def _compare_low(got, ref_low, want):
    bad = []
    for name, w in want.items():
        if w is None:
            continue
        v = judge(name, got[name], w, ref_low[name], dtype=torch.bfloat16, grad=name != "out")
        if not v.ok:
            bad.append(v.message())
    assert not bad, "; ".join(bad)


def _check_against_reference(module, x, dtype, atol=None, rtol=None):
    want = _fwd_bwd(_copy(module, torch.float64, "reference"), x.double())
    got = _fwd_bwd(_copy(module, dtype, None), x.to(dtype))
    assert got["out"].shape == x.shape and got["out"].dtype == dtype
    if dtype == torch.bfloat16:
        _compare_low(got, _fwd_bwd(_copy(module, dtype, "reference"), x.to(dtype)), want)
    else:
        _compare(got, want, dtype, atol, rtol)


# ----------------------------------------------------------------------------- NeighborhoodAttention2D

NA_CASES = [  # (B, X, Y, dim, heads, kernel_size)
    (2, 5, 9, 32, 2, 3),
    (1, 13, 7, 40, 1, 5),
    (1, 4, 6, 32, 2, 7),  # map smaller than the window
]
DTYPES = [pytest.param(t, id=str(t[0]).replace("torch.", "")) for t in TOLS + [(torch.bfloat16, None, None)]]


@pytest.mark.parametrize("case", NA_CASES, ids=_id)
@pytest.mark.parametrize("tol", DTYPES)
def test_na2d_module_matches_reference(case, tol):
    B, X, Y, dim, heads, ks = case
    dtype, atol, rtol = tol
    torch.manual_seed(0)
    m = _randomise(NeighborhoodAttention2D(dim, heads, ks).double(), 1)
    x = torch.randn(B, X, Y, dim, dtype=torch.float64)
    _check_against_reference(m, x, dtype, atol, rtol)


@pytest.mark.parametrize("with_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_natten_state_dict_loads_and_matches_natten(with_bias):
    B, X, Y, C, H, ks = 2, 7, 9, 32, 2, 5
    g = torch.Generator().manual_seed(3)
    sd = {  # NATTEN <= 0.17 layout, built by hand
        "qkv.weight": torch.randn(3 * C, C, generator=g, dtype=torch.float64) * 0.3,
        "rpb": torch.randn(H, 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64),
        "proj.weight": torch.randn(C, C, generator=g, dtype=torch.float64) * 0.3,
        "proj.bias": torch.randn(C, generator=g, dtype=torch.float64),
    }
    if with_bias:
        sd["qkv.bias"] = torch.randn(3 * C, generator=g, dtype=torch.float64)
    m = NeighborhoodAttention2D(C, H, ks, border="clamp", qkv_bias=with_bias).double()
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(B, X, Y, C, generator=g, dtype=torch.float64)
    want = natten_forward({**sd, "qkv.bias": sd.get("qkv.bias")}, x, H, ks)
    with torch.no_grad():
        got = m(x)
    assert (got - want).abs().max().item() < 1e-10


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # NATTEN's flex path on CPU
def test_natten_module_weights_load_and_match_natten():
    natten = pytest.importorskip("natten")
    B, X, Y, C, H, ks = 2, 7, 9, 32, 2, 5
    torch.manual_seed(4)
    theirs = natten.NeighborhoodAttention2D(embed_dim=C, num_heads=H, kernel_size=ks)
    ours = NeighborhoodAttention2D(C, H, ks, border="clamp", rel_pos_bias=False)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(B, X, Y, C)
    with torch.no_grad():  # NATTEN runs on CPU for inference only
        try:
            want = theirs(x)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the NATTEN build
            pytest.skip(f"NATTEN cannot run on CPU here: {e}")
        got = ours(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- LocalGraphAttention

LGA_CASES = [  # (B, C, X, Y, heads, kernel_size)
    (2, 32, 9, 13, 2, 7),
    (1, 48, 5, 11, 3, 3),
    (2, 40, 4, 3, 1, 5),  # map smaller than the window
]


@pytest.mark.parametrize("case", LGA_CASES, ids=_id)
def test_lga_reproduces_unfold_block_fp64(case):
    B, C, X, Y, H, ks = case
    torch.manual_seed(0)
    old = _randomise(UnfoldLocalAttention(C, H, ks).double(), 2)
    ours = LocalGraphAttention.from_unfold_state_dict(old.state_dict(), H, ks)
    assert ours.border == "zero" and ours.rpb is None and isinstance(ours.norm, nn.Identity)
    x = torch.randn(B, C, X, Y, dtype=torch.float64)
    want = _fwd_bwd(old, x)
    got = _fwd_bwd(ours, x)
    # Gradients of the q/k/v convs are the row blocks of the qkv conv's gradient.
    got_split = {
        "out": got["out"],
        "grad x": got["grad x"],
        "grad q_conv.weight": got["grad qkv.weight"][:C],
        "grad k_conv.weight": got["grad qkv.weight"][C : 2 * C],
        "grad v_conv.weight": got["grad qkv.weight"][2 * C :],
        "grad q_conv.bias": got["grad qkv.bias"][:C],
        "grad k_conv.bias": got["grad qkv.bias"][C : 2 * C],
        "grad v_conv.bias": got["grad qkv.bias"][2 * C :],
        "grad out_conv.weight": got["grad proj.weight"],
        "grad out_conv.bias": got["grad proj.bias"],
    }
    assert set(got_split) == set(want)
    _compare(got_split, want, torch.float64, 1e-10, 0.0)


def test_convert_unfold_state_dict_single_qkv_conv_and_names():
    C = 16
    old = _randomise(UnfoldLocalAttention(C, 2, 3).double(), 5)
    sd = old.state_dict()
    fused = {  # the variant of the unfold block with one qkv conv and another output name
        "to_qkv.weight": torch.cat([sd["q_conv.weight"], sd["k_conv.weight"], sd["v_conv.weight"]]),
        "to_qkv.bias": torch.cat([sd["q_conv.bias"], sd["k_conv.bias"], sd["v_conv.bias"]]),
        "to_out.weight": sd["out_conv.weight"],
        "to_out.bias": sd["out_conv.bias"],
    }
    a = convert_unfold_state_dict(sd)
    b = convert_unfold_state_dict(fused, qkv="to_qkv", out="to_out")
    assert set(a) == set(b) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(KeyError, match="out_conv"):
        convert_unfold_state_dict({k: v for k, v in sd.items() if not k.startswith("out_conv")})


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("tol", DTYPES)
def test_lga_matches_reference(border, norm, tol):
    dtype, atol, rtol = tol
    B, C, X, Y, H, ks = 2, 32, 7, 9, 2, 5
    torch.manual_seed(0)
    m = _randomise(LocalGraphAttention(C, H, ks, border=border, norm=norm).double(), 6)
    x = torch.randn(B, C, X, Y, dtype=torch.float64)
    _check_against_reference(m, x, dtype, atol, rtol)


@pytest.mark.parametrize("cls", ["NeighborhoodAttention2D", "LocalGraphAttention"])
def test_rpb_gets_gradient(cls):
    torch.manual_seed(0)
    if cls == "NeighborhoodAttention2D":
        m, x = NeighborhoodAttention2D(32, 2, 5).double(), torch.randn(2, 6, 9, 32, dtype=torch.float64)
    else:
        m, x = LocalGraphAttention(32, 2, 5).double(), torch.randn(2, 32, 6, 9, dtype=torch.float64)
    got = _fwd_bwd(m, x)["grad rpb"]
    want = _fwd_bwd(_copy(m, torch.float64, "reference"), x)["grad rpb"]
    assert got is not None and got.shape == m.rpb.shape
    assert torch.isfinite(got).all() and got.abs().max().item() > 1e-3
    assert (got - want).abs().max().item() < 1e-10


def test_lga_under_bf16_autocast():
    torch.manual_seed(0)
    m = LocalGraphAttention(32, 2, 5)
    x = torch.randn(2, 32, 7, 9)
    want = _fwd_bwd(_copy(m, torch.float64, "reference"), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fwd_bwd(m, x)
        ref_low = _fwd_bwd(_copy(m, torch.float32, "reference"), x)
    assert got["out"].dtype == torch.float32 and m.rpb.grad.dtype == torch.float32
    _compare_low(got, ref_low, want)


# ----------------------------------------------------------------------------- BEVGraphModule


@pytest.mark.parametrize("shape", [(2, 32, 9, 13), (1, 32, 3, 4)], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_bev_module_shapes_dtypes(shape, dtype):
    torch.manual_seed(0)
    m = BEVGraphModule(32, num_layers=2, num_heads=2, kernel_size=7).to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bev_module_matches_reference_fp64():
    torch.manual_seed(0)
    m = _randomise(BEVGraphModule(32, num_layers=2, num_heads=2, kernel_size=5).double(), 8)
    x = torch.randn(1, 32, 6, 11, dtype=torch.float64)
    _check_against_reference(m, x, torch.float64, 1e-10, 1e-10)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = _randomise(BEVGraphModule(32, num_layers=2, num_heads=2, kernel_size=5).double(), 9)
    calls = []
    for blk in m.blocks:
        blk.attn.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64)
    plain = _fwd_bwd(m, x)
    assert len(calls) == 2
    m.set_grad_checkpointing(True)
    calls.clear()
    ckpt = _fwd_bwd(m, x)
    assert len(calls) == 4  # each block ran again in the backward pass
    _compare(ckpt, plain, torch.float64, 1e-12, 0.0)
    calls.clear()
    with torch.no_grad():
        m(x)
    assert len(calls) == 2  # no recomputation without autograd


def test_bev_module_trains():
    """Learns a 3x3 box filter of its input (needs the window's relative positions: rpb)."""
    torch.manual_seed(0)
    C = 16
    m = BEVGraphModule(C, num_layers=2, num_heads=1, kernel_size=5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def batch(n):
        x = torch.randn(n, C, 16, 16, generator=g)
        return x, F.avg_pool2d(x, 3, stride=1, padding=1)

    x_val, y_val = batch(4)
    with torch.no_grad():
        initial = F.mse_loss(m(x_val), y_val).item()
    for _ in range(30):
        x, y = batch(2)
        loss = F.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.mse_loss(m(x_val), y_val).item()
    assert final < 0.3 * initial, f"held-out loss {initial:.3f} -> {final:.3f}"


# ----------------------------------------------------------------------------- bad input

BAD_CTOR = [
    ("dim", lambda: NeighborhoodAttention2D(30, 4)),
    ("num_heads", lambda: NeighborhoodAttention2D(32, 0)),
    ("kernel_size", lambda: NeighborhoodAttention2D(32, 2, kernel_size=4)),
    ("border", lambda: NeighborhoodAttention2D(32, 2, border="reflect")),
    ("backend", lambda: NeighborhoodAttention2D(32, 2, backend="cuda")),
    ("channels", lambda: LocalGraphAttention(30, 4)),
    ("norm", lambda: LocalGraphAttention(32, 2, norm="instance")),
    ("num_layers", lambda: BEVGraphModule(32, num_layers=0)),
    ("mlp_ratio", lambda: BEVGraphModule(32, mlp_ratio=0.0)),
]


@pytest.mark.parametrize("arg,make", BAD_CTOR, ids=[a for a, _ in BAD_CTOR])
def test_bad_constructor_args(arg, make):
    with pytest.raises(ValueError, match=arg):
        make()


BAD_X = [
    ("na2d_channels_first", lambda: NeighborhoodAttention2D(32, 2, 3), torch.randn(1, 32, 5, 5)),
    ("na2d_3d", lambda: NeighborhoodAttention2D(32, 2, 3), torch.randn(5, 5, 32)),
    ("lga_channels_last", lambda: LocalGraphAttention(32, 2, 3), torch.randn(1, 5, 5, 32)),
    ("bev_wrong_channels", lambda: BEVGraphModule(32, num_heads=2), torch.randn(1, 16, 5, 5)),
]


@pytest.mark.parametrize("make,x", [b[1:] for b in BAD_X], ids=[b[0] for b in BAD_X])
def test_bad_input_names_x(make, x):
    with pytest.raises(ValueError, match=r"^x must be"):
        make()(x)


def test_clamp_on_small_map_raises_before_compute():
    m = NeighborhoodAttention2D(32, 2, 5, border="clamp")
    with pytest.raises(ValueError, match="clamp"):
        m(torch.randn(1, 4, 9, 32))
