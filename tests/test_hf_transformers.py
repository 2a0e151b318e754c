"""attn_implementation="dcal" in Hugging Face transformers: tiny random models of each family built
from configs (nothing downloaded), fp64, against attn_implementation="eager".

transformers' eager attention computes its softmax in float32 even for float64 inputs
(``softmax(..., dtype=torch.float32).to(query.dtype)``), which alone puts it ~1e-9 away from any
exact fp64 attention (its own "sdpa" included). The fixture ``fp64_eager`` lets that softmax
run in float64 for float64 inputs, so eager is an fp64 truth and 1e-10 is a meaningful bound.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dcal.integrations.transformers as hfd  # noqa: E402
from dcal import ops  # noqa: E402

TOL = 1e-10


@pytest.fixture
def fp64_eager(monkeypatch):
    real = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return real(x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op's calls made by the integration."""
    calls = []
    real = ops.multi_kv_attention

    def spy(q, kv, **kw):
        calls.append((tuple(q.shape), len(kv), kw.get("backend")))
        return real(q, kv, **kw)

    monkeypatch.setattr(hfd.ops, "multi_kv_attention", spy)
    return calls


def _run(model, impl, inputs, **kw):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kw)
    tensors = [t for t in (out[k] for k in out.keys()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors], grads


def _compare(model, inputs, **kw):
    ref_out, ref_grads = _run(model, "eager", inputs, **kw)
    out, grads = _run(model, "dcal", inputs, **kw)
    assert len(out) == len(ref_out) > 0
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL
    # every parameter gets a gradient, except a mask token that only masked pixel inputs use
    n_params = sum(1 for n, p in model.named_parameters() if p.requires_grad and not n.endswith("mask_token"))
    assert set(grads) == set(ref_grads) and len(grads) == n_params
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert worst <= TOL, worst
    return out


def _images(b=2, size=16, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _vit(cls_name="ViTForImageClassification", config_name="ViTConfig", **extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
        **extra,
    )
    return getattr(transformers, cls_name)(cfg).double()


def test_register_adds_dcal_to_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hfd.register()  # idempotent
    assert ALL_ATTENTION_FUNCTIONS["dcal"] is hfd.dcal_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["dcal"] is hfd.dcal_mask
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    cfg._attn_implementation = "dcal"
    assert transformers.ViTModel(cfg).config._attn_implementation == "dcal"


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_vision_models_equal_eager(family, fp64_eager, fused_calls):
    if family == "vit":
        model = _vit()
    elif family == "deit":
        model = _vit("DeiTForImageClassification", "DeiTConfig")
    else:
        torch.manual_seed(0)
        cfg = transformers.Dinov2Config(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            num_labels=3,
            layerscale_value=0.5,
        )
        model = transformers.Dinov2ForImageClassification(cfg).double()
    model.train()  # attention dropout is 0: the fused path runs in training too
    _compare(model, {"pixel_values": _images()})
    # the dcal run went through the fused op, once per layer, one key/value segment each
    assert len(fused_calls) == 2 and all(n == 1 for _, n, _ in fused_calls)


def _clip(family):
    torch.manual_seed(0)
    text = dict(
        vocab_size=50,
        eos_token_id=49,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
    )
    vision = dict(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    if family == "clip":
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        return transformers.CLIPModel(cfg).double()
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    return transformers.SiglipModel(cfg).double()


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("padding", [False, True])
def test_clip_siglip_equal_eager(family, padding, fp64_eager, fused_calls):
    model = _clip(family).train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 49, (2, 7), generator=gen)
    ids[:, -1] = 49  # CLIP pools at the highest token id
    inputs = {"input_ids": ids, "pixel_values": _images()}
    if padding:
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        inputs["attention_mask"] = mask
    _compare(model, inputs)
    vision_tokens = 17 if family == "clip" else 16  # SigLIP has no class token
    vision_calls = [c for c in fused_calls if c[0][2] == vision_tokens]
    text_calls = [c for c in fused_calls if c[0][2] == 7]
    assert len(vision_calls) == 2  # the vision tower is fused
    if family == "clip" or padding:
        # CLIP's text tower is causal, a padded text batch is masked: those run on PyTorch SDPA
        assert text_calls == []
    else:
        assert len(text_calls) == 2  # SigLIP's unpadded text tower is full attention: fused


def _eager_pwca(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hand-written PWCA: queries of image b over the keys/values of b and of pair[b], concatenated."""
    perm = kwargs["dcal_pair"]
    k = torch.cat([key, key[perm]], dim=2)
    v = torch.cat([value, value[perm]], dim=2)
    logits = query @ k.transpose(-1, -2) * scaling
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ v).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("perm", [[2, 0, 1], [1, 1, 0]])
def test_pwca_equals_handwritten_eager_pwca(perm, fused_calls):
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("test_eager_pwca", _eager_pwca)
    model = _vit().train()
    pair = torch.tensor(perm)
    inputs = {"pixel_values": _images(3)}
    ref_out, ref_grads = _run(model, "test_eager_pwca", inputs, dcal_pair=pair)
    out, grads = _run(model, "dcal", inputs, dcal_pair=pair)
    assert (out[0] - ref_out[0]).abs().max().item() <= TOL
    assert set(grads) == set(ref_grads)
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= TOL
    assert len(fused_calls) == 2 and all(n == 2 for _, n, _ in fused_calls)  # two segments: own + pair
    # and PWCA is not self-attention: the logits differ from the unpaired forward
    plain, _ = _run(model, "dcal", inputs)
    assert (plain[0] - out[0]).abs().max().item() > 1e-6
    # with output_attentions the maps cover both segments (17 own + 17 pair keys), same logits
    with torch.no_grad():
        res = model(**inputs, dcal_pair=pair, output_attentions=True)
    assert [tuple(a.shape) for a in res.attentions] == [(3, 2, 17, 34)] * 2
    assert torch.allclose(res.attentions[0].sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert (res.logits - out[0]).abs().max().item() <= TOL


def _eager_rollout(attentions, residual=0.5):
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=attentions[0].dtype)
    joint = None
    for a in attentions:
        s = (1 - residual) * a.mean(1) + residual * eye
        joint = s if joint is None else s @ joint
    return joint[:, 0]


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_rollout_equals_eager_rollout_from_maps(family, fp64_eager, fused_calls):
    if family == "vit":
        model = _vit().eval()
    else:
        torch.manual_seed(0)
        cfg = transformers.Dinov2Config(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2
        )
        model = transformers.Dinov2Model(cfg).double().eval()
    x = _images(2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(pixel_values=x, output_attentions=True).attentions
    ref = _eager_rollout(maps)
    model.set_attn_implementation("dcal")
    with torch.no_grad(), hfd.collect_rollout() as r:
        out = model(pixel_values=x, dcal_rollout=True)
    assert len(r) == len(maps) and len(fused_calls) == len(maps)  # fused, no maps
    assert out.attentions is None
    got = r.rollout
    assert got.shape == ref.shape == (2, 17)
    assert (got.double() - ref).abs().max().item() <= TOL
    # an explicit collector works without the context manager
    c = hfd.RolloutCollector()
    with torch.no_grad():
        model(pixel_values=x, dcal_rollout=c)
    assert torch.equal(c.rollout, got)
    # a second forward into the same collector would mix blocks: refused
    with pytest.raises(RuntimeError, match="fresh collector"), torch.no_grad():
        model(pixel_values=x, dcal_rollout=c)


def test_rollout_two_towers_and_checkpointing(fp64_eager):
    model = _clip("clip").eval()
    model.set_attn_implementation("dcal")
    ids = torch.randint(1, 49, (2, 7), generator=torch.Generator().manual_seed(3))
    x = _images(2)
    with torch.no_grad(), hfd.collect_rollout() as r:
        model.vision_model(pixel_values=x, dcal_rollout=True)
    assert r.rollout.shape == (2, 17)
    # both towers in one forward: the causal text tower cannot give a rollout
    with pytest.raises(ValueError, match="causal"), hfd.collect_rollout():
        model(input_ids=ids, pixel_values=x, dcal_rollout=True)
    # gradient checkpointing re-runs the layers in backward: they must not record twice
    vit = _vit().train()
    vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert vit.is_activation_checkpointing
    vit.set_attn_implementation("dcal")
    with hfd.collect_rollout() as r2:
        vit(pixel_values=x, dcal_rollout=True).logits.sum().backward()
    assert len(r2) == 2 and r2.rollout.shape == (2, 17)


def test_output_attentions_returns_eager_maps(fp64_eager):
    model = _vit().eval()
    x = _images(2)
    model.set_attn_implementation("eager")
    ref = model(pixel_values=x, output_attentions=True).attentions
    model.set_attn_implementation("dcal")
    got = model(pixel_values=x, output_attentions=True).attentions
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= TOL


def test_attention_dropout_in_training_runs_sdpa(fused_calls):
    model = _vit(attention_probs_dropout_prob=0.5).train()
    model.set_attn_implementation("dcal")
    x = _images(2)
    torch.manual_seed(5)
    a = model(pixel_values=x).logits
    assert fused_calls == []  # dropout on the probabilities: not the fused path
    torch.manual_seed(5)
    model.set_attn_implementation("sdpa")
    b = model(pixel_values=x).logits
    assert torch.equal(a, b)  # the same SDPA call, the same dropout mask
    model.eval()
    model.set_attn_implementation("dcal")
    model(pixel_values=x)
    assert len(fused_calls) == 2  # in eval the fused op runs


def test_bad_keyword_arguments_refused(fused_calls):
    model = _vit().eval()
    model.set_attn_implementation("dcal")
    x = _images(3)
    for bad, msg in [
        (torch.tensor([0, 1]), "length"),
        (torch.tensor([0, 1, 3]), "outside"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
        ([0, 1, 2], "integer"),
        (torch.zeros(3, 1, dtype=torch.long), "1-D"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model(pixel_values=x, dcal_pair=bad)
    with pytest.raises(ValueError, match="collect_rollout"):
        model(pixel_values=x, dcal_rollout=True)
    with pytest.raises(ValueError, match="RolloutCollector"):
        model(pixel_values=x, dcal_rollout="yes")
    with pytest.raises(ValueError, match="rollout"), hfd.collect_rollout():
        model(pixel_values=x, dcal_rollout=True, dcal_pair=torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="backend"):
        model(pixel_values=x, dcal_backend="nope")
    assert fused_calls == [] or all(c[2] == "nope" for c in fused_calls)
    q = torch.randn(1, 2, 5, 16)
    for name in ("softcap", "sliding_window", "s_aux", "position_bias"):
        with pytest.raises(NotImplementedError, match=name):
            hfd.dcal_attention_forward(torch.nn.Module(), q, q, q, None, scaling=0.25, **{name: 1.0})
    # PWCA with a mask: the pair's keys have no place in it
    siglip = _clip("siglip").eval()
    siglip.set_attn_implementation("dcal")
    ids = torch.randint(1, 49, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    with pytest.raises(ValueError, match="mask"), hfd.attention_options(dcal_pair=torch.tensor([1, 0])):
        siglip.text_model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="unknown"):
        with hfd.attention_options(pair=torch.tensor([1, 0])):
            pass


def test_attention_options_for_modules_that_drop_model_kwargs(fp64_eager, fused_calls):
    """SigLIP's attention (transformers 5.24) does not pass model(...)'s keyword arguments on: the
    context manager sets PWCA and the rollout there; output_attentions is honoured too."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("test_eager_pwca", _eager_pwca)
    model = _clip("siglip").vision_model.train()
    x = _images(3)
    pair = torch.tensor([2, 0, 1])
    with hfd.attention_options(dcal_pair=pair):
        out, grads = _run(model, "dcal", {"pixel_values": x})
        # the hand-written PWCA reads the pair from its kwargs: give it them through a wrapper
        AttentionInterface.register("test_eager_pwca_ctx", lambda *a, **k: _eager_pwca(*a, **k, dcal_pair=pair))
        ref_out, ref_grads = _run(model, "test_eager_pwca_ctx", {"pixel_values": x})
    assert len(fused_calls) == 2 and all(n == 2 for _, n, _ in fused_calls)
    assert max((a - b).abs().max().item() for a, b in zip(out, ref_out)) <= TOL
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= TOL
    model.eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref_maps = model(pixel_values=x, output_attentions=True).attentions
    model.set_attn_implementation("dcal")
    with torch.no_grad():
        maps = model(pixel_values=x, output_attentions=True).attentions
    assert len(maps) == 2 and max((a - b).abs().max().item() for a, b in zip(maps, ref_maps)) <= TOL
    with torch.no_grad(), hfd.collect_rollout() as r, hfd.attention_options(dcal_rollout=True):
        model(pixel_values=x)
    assert (r.rollout.double() - _eager_rollout(ref_maps)).abs().max().item() <= TOL


def test_backend_keyword_and_grouped_query_heads(fused_calls):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    mod = torch.nn.Module()
    mod.is_causal = False
    out, w = hfd.dcal_attention_forward(mod, q, k, v, None, scaling=0.3, dcal_backend="reference")
    assert w is None and out.shape == (2, 9, 4, 16)
    assert fused_calls[-1][2] == "reference"
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.softmax(q @ kr.transpose(-1, -2) * 0.3, -1) @ vr
    assert (out.transpose(1, 2) - ref).abs().max().item() <= TOL
    g = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, (q, k), g)
    rq, rk = torch.autograd.grad(ref.transpose(1, 2), (q, k), g)
    assert (dq - rq).abs().max().item() <= TOL and (dk - rk).abs().max().item() <= TOL


def test_from_pretrained_with_dcal_and_fp32(tmp_path, fused_calls):
    """A saved model (a local folder: nothing downloaded) loads with attn_implementation="dcal";
    fp32 runs the fused op and agrees with "sdpa" to fp32 rounding."""
    _vit().float().save_pretrained(tmp_path)
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="dcal").eval()
    assert model.config._attn_implementation == "dcal"
    x = _images(2).float()
    with torch.no_grad():
        a = model(pixel_values=x).logits
        model.set_attn_implementation("sdpa")
        b = model(pixel_values=x).logits
    assert len(fused_calls) == 2 and a.dtype == torch.float32
    assert (a - b).abs().max().item() <= 1e-5


def test_rollouts_of_two_stacks():
    model = _clip("siglip").eval()  # vision and (unpadded, full-attention) text towers
    model.set_attn_implementation("dcal")
    ids = torch.randint(1, 49, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), hfd.collect_rollout() as r, hfd.attention_options(dcal_rollout=True):
        model(input_ids=ids, pixel_values=_images(2))
    rollouts = r.rollouts
    assert {k: tuple(t.shape) for k, t in rollouts.items()} == {
        "SiglipVisionConfig": (2, 16),
        "SiglipTextConfig": (2, 7),
    }
    with pytest.raises(RuntimeError, match="rollouts"):
        r.rollout
