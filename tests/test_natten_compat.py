"""dcal.nn.NeighborhoodAttention2D as a drop-in for NATTEN 0.21's module (constructor, strict
state dict, forward; dilation 1 and 2, kernel 3/5/7), and the modules' q/k/v handed to the op as
strided views of the projection output (no copy)."""

import pytest
import torch

import dcal.nn.neighborhood as nbh
from dcal.nn import LocalGraphAttention, NeighborhoodAttention2D

natten = pytest.importorskip("natten")

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]  # NATTEN on CPU


def _natten(C, H, ks, dil, **kw):
    torch.manual_seed(0)
    m = natten.NeighborhoodAttention2D(embed_dim=C, num_heads=H, kernel_size=ks, dilation=dil, **kw)
    with torch.no_grad():
        m.qkv.bias.normal_() if m.qkv.bias is not None else None
        m.proj.bias.normal_()
    return m.eval()


def _natten_forward(m, x):
    with torch.no_grad():  # NATTEN runs on CPU for inference only
        try:
            return m(x)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the NATTEN build
            pytest.skip(f"NATTEN cannot run on CPU here: {e}")


@pytest.mark.parametrize("dil", [1, 2], ids=lambda d: f"dil{d}")
@pytest.mark.parametrize("ks", [3, 5, 7], ids=lambda k: f"k{k}")
def test_state_dict_loads_strictly_and_forward_matches(ks, dil):
    C, H = 32, 2
    X, Y = max(ks * dil, 9) + 1, max(ks * dil, 9) + 3  # odd sizes, >= kernel_size * dilation
    theirs = _natten(C, H, ks, dil)
    x = torch.randn(1, X, Y, C, generator=torch.Generator().manual_seed(1))
    want = _natten_forward(theirs, x)
    # NATTEN's constructor, NATTEN's semantics spelled out, state dict loaded strictly ...
    ours = NeighborhoodAttention2D(
        embed_dim=C,
        num_heads=H,
        kernel_size=ks,
        dilation=dil,
        qkv_bias=True,
        qk_scale=None,
        proj_drop=0.0,
        border="clamp",
        rel_pos_bias=False,
    )
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # ... or everything read from the NATTEN module.
    built = NeighborhoodAttention2D.from_natten(theirs)
    assert (built.kernel_size, built.dilation, built.border, built.rpb) == (ks, dil, "clamp", None)
    with torch.no_grad():
        for m in (ours.eval(), built):
            torch.testing.assert_close(m(x), want, atol=1e-6, rtol=1e-6)


def test_from_natten_reads_scale_bias_and_pairs():
    C, H = 48, 3
    theirs = _natten(C, H, (5, 5), (2, 2), qkv_bias=False, qk_scale=0.3)
    ours = NeighborhoodAttention2D.from_natten(theirs)
    assert ours.qkv.bias is None and ours.scale == pytest.approx(0.3)
    x = torch.randn(2, 11, 12, C, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _natten_forward(theirs, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("border", ["clamp", "zero"])
def test_dilated_module_gradients_match_reference(border):
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(32, 2, 3, border=border, dilation=2).double()
    ref = NeighborhoodAttention2D(32, 2, 3, border=border, dilation=2, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 7, 9, 32, dtype=torch.float64)
    g = torch.randn(1, 7, 9, 32, dtype=torch.float64)
    res = []
    for mod in (m, ref):
        xi = x.clone().requires_grad_()
        out = mod(xi)
        res.append([out] + list(torch.autograd.grad(out, [xi] + list(mod.parameters()), g)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- no copies of qkv


def _spy(monkeypatch):
    seen = []
    real = nbh.neighborhood_attention2d

    def spy(q, k, v, **kw):
        seen.append((q, k, v))
        return real(q, k, v, **kw)

    monkeypatch.setattr(nbh, "neighborhood_attention2d", spy)
    return seen


def test_na2d_module_passes_views_of_the_projection(monkeypatch):
    seen = _spy(monkeypatch)
    B, X, Y, C, H = 2, 5, 7, 32, 2
    m = NeighborhoodAttention2D(C, H, 3)
    m.qkv.register_forward_hook(lambda mod, i, out: seen.append(out))
    m(torch.randn(B, X, Y, C))
    qkv_out, (q, k, v) = seen[0], seen[1]
    D = C // H
    for i, t in enumerate((q, k, v)):
        assert t.shape == (B, H, X, Y, D)
        assert t.data_ptr() == qkv_out.data_ptr() + i * C * t.element_size(), "q/k/v must be views, not copies"
        assert t.stride() == (X * Y * 3 * C, D, Y * 3 * C, 3 * C, 1)


@pytest.mark.parametrize("norm", ["layer", None])
def test_lga_passes_views_of_the_conv_output(monkeypatch, norm):
    """norm=None: the conv output is channels-first (head-dim stride X*Y); the per-pixel
    LayerNorm hands the conv a channels-last input, whose output is channels-last (unit stride)."""
    seen = _spy(monkeypatch)
    B, C, X, Y, H = 2, 32, 5, 7, 2
    m = LocalGraphAttention(C, H, 3, norm=norm)
    m.qkv.register_forward_hook(lambda mod, i, out: seen.append(out))
    m(torch.randn(B, C, X, Y))
    conv_out, (q, k, v) = seen[0], seen[1]
    D = C // H
    for i, t in enumerate((q, k, v)):
        assert t.shape == (B, H, X, Y, D)
        assert t.untyped_storage().data_ptr() == conv_out.untyped_storage().data_ptr(), "q/k/v must be views"
        assert torch.equal(t, conv_out[:, i * C : (i + 1) * C].reshape(B, H, D, X, Y).permute(0, 1, 3, 4, 2))
        if norm is None:
            assert t.stride() == (3 * C * X * Y, D * X * Y, Y, 1, X * Y)


# ----------------------------------------------------------------------------- refusals

BAD = [
    ("kernel_size", lambda: NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=(3, 5))),
    ("dilation", lambda: NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3, dilation=(1, 2))),
    ("dilation", lambda: NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3, dilation=0)),
    ("stride", lambda: NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3, stride=2)),
    ("is_causal", lambda: NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3, is_causal=True)),
    ("embed_dim", lambda: NeighborhoodAttention2D(32, 2, 3, embed_dim=32)),
    ("num_heads", lambda: NeighborhoodAttention2D(embed_dim=32, kernel_size=3)),
]


@pytest.mark.parametrize("arg,make", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_constructor_names_the_argument(arg, make):
    with pytest.raises((ValueError, TypeError), match=arg):
        make()


def test_clamp_window_larger_than_map_raises_naming_dilation():
    m = NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=5, dilation=2, border="clamp")
    with pytest.raises(ValueError, match=r"kernel_size\*dilation.*kernel_size 5, dilation 2"):
        m(torch.randn(1, 12, 9, 32))  # 9 < 5 * 2


def test_from_natten_refuses_stride():
    theirs = natten.NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention2D.from_natten(theirs)
    with pytest.raises(TypeError, match="from_natten needs"):
        NeighborhoodAttention2D.from_natten(torch.nn.Linear(3, 3))
