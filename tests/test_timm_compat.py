"""Drop-in use in timm and torchvision models: dcal.nn.PWCAAttention / FusedMultiheadAttention
against the real timm ``Attention`` and ``nn.MultiheadAttention``, and dcal.nn.fuse_attention on
whole timm / torchvision ViTs (random weights, no download).

Whole-model tests run at batch 1 and a small input (48 px: 3x3 patches + CLS = 10 tokens) with the
architecture otherwise unchanged (same widths, depths, heads, patch size), in fp64.
"""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from dcal import ops
from dcal.nn import FusedMultiheadAttention, PWCAAttention, fuse_attention

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


ATOL = RTOL = 1e-10


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach dcal's fused op (so a test sees the fused path was taken)."""
    calls = []
    real = ops.multi_kv_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ops, "multi_kv_attention", spy)
    return calls


def _grads(module, out, seed=3, **inputs):
    """Gradients of every parameter of ``module`` (and of the named ``inputs``) for a fixed
    random output gradient."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad] + list(inputs.items())
    return dict(zip([n for n, _ in named], torch.autograd.grad(out, [p for _, p in named], g, allow_unused=True)))


def _assert_same(got, want, what):
    bad = [
        n
        for n in want
        if (got[n] is None) != (want[n] is None)
        or (want[n] is not None and not torch.allclose(got[n], want[n], atol=ATOL, rtol=RTOL))
    ]
    assert not bad, f"{what}: {bad[:5]} differ"


# ----------------------------------------------------------------------------- the module alone

TIMM_VARIANTS = {
    "default": dict(qkv_bias=True),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
    "qk_norm": dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    "scale_norm": dict(qkv_bias=True, scale_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)),
    "head_dim_out": dict(qkv_bias=True, attn_head_dim=24, dim_out=40),
    "gated": dict(qkv_bias=True, gated=True),
}
CALLS = ["plain", "bool_mask", "float_mask", "causal", "dropout_train"]


def _mask(kind, B, H, N, g):
    if kind == "bool_mask":
        m = torch.rand(B, 1, N, N, generator=g) > 0.3
        return m | torch.eye(N, dtype=torch.bool)  # no fully masked row
    if kind == "float_mask":
        return torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return None


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_module_matches_timm_attention(variant, call):
    kw = TIMM_VARIANTS[variant]
    B, N, C, H = 2, 11, 32, 4
    torch.manual_seed(0)
    theirs = Attention(C, H, attn_drop=0.3 if call == "dropout_train" else 0.0, **kw).double()
    with torch.no_grad():  # non-trivial norm affines
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = PWCAAttention(C, H, attn_drop=theirs.attn_drop.p, **kw).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train(call == "dropout_train"), ours.train(call == "dropout_train")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _mask(call, B, H, N, g)
    res = []
    for m in (theirs, ours):
        torch.manual_seed(5)
        out = m(x, attn_mask=mask, is_causal=call == "causal")
        res.append((out, _grads(m, out, input_x=x)))
    torch.testing.assert_close(res[1][0], res[0][0], atol=ATOL, rtol=RTOL)
    _assert_same(res[1][1], res[0][1], "gradients")
    if call == "dropout_train":
        ours.eval()
        assert (ours(x) - res[1][0]).abs().max() > 1e-3, "attention dropout was ignored in training"


def test_mask_rows_follow_query_index():
    torch.manual_seed(0)
    m = PWCAAttention(32, 4, qkv_bias=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    idx = torch.tensor([[0, 4, 7], [2, 3, 8]])
    full = m(x, attn_mask=mask)
    got = m(x, attn_mask=mask, query_index=idx)
    torch.testing.assert_close(got, full.gather(1, idx[..., None].expand(-1, -1, 32)), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- nn.MultiheadAttention

MHA_CALLS = ["self", "cross", "attn_mask_bool", "attn_mask_float_3d", "key_padding", "seq_first", "dropout_train"]


@pytest.mark.parametrize("call", MHA_CALLS)
def test_fused_mha_matches_torch(call):
    B, L, S, E, H = 2, 7, 5, 32, 4
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(
        E, H, dropout=0.4 if call == "dropout_train" else 0.0, batch_first=call != "seq_first"
    ).double()
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = FusedMultiheadAttention.from_mha(copy.deepcopy(theirs))
    theirs.train(call == "dropout_train"), ours.train(call == "dropout_train")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    kv = torch.randn(B, S, E, generator=g, dtype=torch.float64) if call == "cross" else q
    if call == "seq_first":
        q = kv = q.transpose(0, 1).contiguous()
    Sk = kv.shape[1] if call != "seq_first" else kv.shape[0]
    kw = {}
    if call == "attn_mask_bool":
        kw["attn_mask"] = torch.rand(L, Sk, generator=g) > 0.7
        kw["attn_mask"].fill_diagonal_(False)
    if call == "attn_mask_float_3d":
        kw["attn_mask"] = torch.randn(B * H, L, Sk, generator=g, dtype=torch.float64)
    if call == "key_padding":
        kw["key_padding_mask"] = torch.zeros(B, Sk, dtype=torch.bool)
        kw["key_padding_mask"][0, -2:] = True
    outs = []
    for m in (theirs, ours):
        torch.manual_seed(5)
        out, w = m(q, kv, kv, need_weights=False, **kw)
        assert w is None
        outs.append((out, _grads(m, out)))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=ATOL, rtol=RTOL)
    _assert_same(outs[1][1], outs[0][1], "parameter gradients")


# ----------------------------------------------------------------------------- whole models


def _random_model(factory):
    """``factory()`` built on the meta device, then filled with seeded random fp64 weights
    (uniform, std 1/sqrt(fan_in) for matrices, 0.5 for vectors): the libraries' own init of 86M
    weights would take longer than the test."""
    with torch.device("meta"):
        model = factory().double()
    assert not list(model.buffers()), "to_empty would leave buffers uninitialised"
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.5
            p.uniform_(-std * 3**0.5, std * 3**0.5, generator=g)
    return model.train()


def _model_case(model, x, **fwd):
    """Logits and every parameter gradient of ``model`` before and after fuse_attention (in place)."""
    out = model(x, **fwd)
    before = (out.detach(), _grads(model, out))
    params = {n: p for n, p in model.named_parameters()}
    assert fuse_attention(model) is model
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters()), "the parameter tensors must be kept"
    out = model(x, **fwd)
    torch.testing.assert_close(out, before[0], atol=ATOL, rtol=RTOL)
    _assert_same(_grads(model, out), before[1], "parameter gradients")


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_timm_vit_logits_and_gradients(name, fused_calls):
    model = _random_model(lambda: timm.create_model(name, pretrained=False, img_size=48))
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    _model_case(model, x)
    n = sum(isinstance(m, PWCAAttention) for m in model.modules())
    assert n == len(model.blocks) and not any(type(m) is Attention for m in model.modules())
    assert len(fused_calls) == n, "the converted model must run dcal's fused op in every block"


def test_torchvision_vit_b_16_logits_and_gradients(fused_calls):
    tv = pytest.importorskip("torchvision")
    model = _random_model(lambda: tv.models.vit_b_16(weights=None, image_size=48))
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    _model_case(model, x)
    n = sum(isinstance(m, FusedMultiheadAttention) for m in model.modules())
    assert n == 12 and len(fused_calls) == 12


def test_timm_vit_with_attn_mask_and_deit():
    """A mask passed through timm's forward_features reaches SDPA unchanged; DeiT converts too."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 5) > 0.4
    mask |= torch.eye(5, dtype=torch.bool)
    want = model.forward_features(x, attn_mask=mask)
    fuse_attention(model)
    torch.testing.assert_close(model.forward_features(x, attn_mask=mask), want, atol=ATOL, rtol=RTOL)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32).double().eval()
    want = deit(x)
    torch.testing.assert_close(fuse_attention(deit)(x), want, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- refusals


class _ExtraAttention(Attention):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.temperature = nn.Parameter(torch.ones(1))


BAD_MODELS = [
    ("timm_subclass", lambda: nn.Sequential(_ExtraAttention(32, 4)), r"0 is a .*_ExtraAttention"),
    ("mha_kdim", lambda: nn.Sequential(nn.MultiheadAttention(32, 4, kdim=16, vdim=16)), r"0: .*kdim=16"),
    ("mha_bias_kv", lambda: nn.Sequential(nn.MultiheadAttention(32, 4, add_bias_kv=True)), "add_bias_kv"),
    ("mha_zero_attn", lambda: nn.Sequential(nn.MultiheadAttention(32, 4, add_zero_attn=True)), "add_zero_attn"),
]


@pytest.mark.parametrize("make,match", [b[1:] for b in BAD_MODELS], ids=[b[0] for b in BAD_MODELS])
def test_converter_refuses_unknown_variants(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fuse_attention(make())


def test_converter_refuses_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fuse_attention(nn.Sequential(), backend="cuda")


BAD_CALLS = [
    ("mask_shape", lambda m, x: m(x, attn_mask=torch.ones(2, 4, 9, 8, dtype=torch.bool)), "attn_mask must broadcast"),
    ("mask_dtype", lambda m, x: m(x, attn_mask=torch.ones(9, 9, dtype=torch.int64)), "attn_mask must be a bool"),
    (
        "mask_pair_width",
        lambda m, x: m(x, attn_mask=torch.ones(9, 9, dtype=torch.bool), pair=x),
        r"attn_mask must broadcast .*\[2, 4, 9, 18\]",
    ),
    ("causal_pair", lambda m, x: m(x, is_causal=True, pair=x), "is_causal"),
    ("causal_and_mask", lambda m, x: m(x, attn_mask=torch.ones(9, 9, dtype=torch.bool), is_causal=True), "is_causal"),
    ("causal_not_bool", lambda m, x: m(x, is_causal=1), "is_causal"),
    (
        "rollout_mask",
        lambda m, x: m(x, attn_mask=torch.ones(9, 9, dtype=torch.bool), return_rollout=True),
        "return_rollout",
    ),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_pwca_bad_mask_calls_raise(call, match):
    m = PWCAAttention(32, 4)
    with pytest.raises(ValueError, match=match):
        call(m, torch.randn(2, 9, 32))


def test_mha_bad_calls_raise():
    m = FusedMultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="need_weights"):
        m(x, x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, need_weights=False, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, need_weights=False, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        m(x, x, x, need_weights=False, is_causal=True)


def test_timm_positional_head_dim_is_refused():
    with pytest.raises(ValueError, match="qkv_bias"):
        PWCAAttention(32, 4, 8)  # timm's third positional argument is attn_head_dim


def test_converting_a_bare_module_returns_its_replacement():
    attn = Attention(32, 4, qkv_bias=True)
    new = fuse_attention(attn)
    assert isinstance(new, PWCAAttention) and new.qkv is attn.qkv and new.proj is attn.proj
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    new = fuse_attention(mha)
    assert isinstance(new, FusedMultiheadAttention) and new.in_proj_weight is mha.in_proj_weight
