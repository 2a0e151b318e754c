"""HF DiNAT on dcal: transformers' DinatModel, whose own path calls NATTEN's natten2dqkrpb /
natten2dav (removed in NATTEN 0.17.5), built from a tiny random config and converted with
use_dcal_neighborhood, against a plain-PyTorch implementation of those functions' semantics
written here from NATTEN 0.14-0.17's CPU kernels (get_window_start / get_pb_start), run inside
the module forward of transformers 4.x (heads-first [B, H, X, Y, D] maps). fp64, forward and every
parameter gradient to 1e-10.
"""

import copy
import math
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dcal.integrations.dinat as dn  # noqa: E402
import dcal.integrations.transformers as hfd  # noqa: E402

TOL = 1e-10


# ----------------------------------------------------------------------------- NATTEN <= 0.17.4, by the letter


def get_window_start(index, length, kernel_size, neighborhood_size, dilation):
    if dilation <= 1:
        return max(index - neighborhood_size, 0) + (index + neighborhood_size >= length) * (
            length - index - neighborhood_size - 1
        )
    ni = index - neighborhood_size * dilation
    if ni < 0:
        return index % dilation
    if index + neighborhood_size * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * neighborhood_size * dilation
        return a + imodd - kernel_size * dilation
    return ni


def get_pb_start(index, length, kernel_size, neighborhood_size, dilation):
    if dilation <= 1:
        return (
            neighborhood_size
            + (index < neighborhood_size) * (neighborhood_size - index)
            + (index + neighborhood_size >= length) * (length - index - 1 - neighborhood_size)
        )
    if index - neighborhood_size * dilation < 0:
        return kernel_size - 1 - (index // dilation)
    if index + neighborhood_size * dilation >= length:
        return (length - index - 1) // dilation
    return neighborhood_size


def _axis(length, kernel_size, dilation):
    nb = kernel_size // 2
    keys, pbs = [], []
    for i in range(length):
        s = get_window_start(i, length, kernel_size, nb, dilation)
        p = get_pb_start(i, length, kernel_size, nb, dilation)
        keys.append([s + u * dilation for u in range(kernel_size)])
        pbs.append([p + u for u in range(kernel_size)])
    return torch.tensor(keys), torch.tensor(pbs)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """[B, H, X, Y, D] x [B, H, X, Y, D] + rpb [H, 2k-1, 2k-1] -> [B, H, X, Y, k*k]."""
    B, H, X, Y, D = query.shape
    kx, px = _axis(X, kernel_size, dilation)
    ky, py = _axis(Y, kernel_size, dilation)
    out = query.new_zeros(B, H, X, Y, kernel_size * kernel_size)
    for a in range(kernel_size):
        for c in range(kernel_size):
            k_sel = key[:, :, kx[:, a]][:, :, :, ky[:, c]]  # [B, H, X, Y, D]: key at (kx[i, a], ky[j, c])
            bias = rpb[:, px[:, a]][:, :, py[:, c]]  # [H, X, Y]
            out[..., a * kernel_size + c] = (query * k_sel).sum(-1) + bias
    return out


def natten2dav(attn, value, kernel_size, dilation):
    B, H, X, Y, D = value.shape
    kx, _ = _axis(X, kernel_size, dilation)
    ky, _ = _axis(Y, kernel_size, dilation)
    out = value.new_zeros(B, H, X, Y, D)
    for a in range(kernel_size):
        for c in range(kernel_size):
            out = out + attn[..., a * kernel_size + c, None] * value[:, :, kx[:, a]][:, :, :, ky[:, c]]
    return out


def reference_forward(self, hidden_states, output_attentions=False):
    """transformers 4.x's NeighborhoodAttention.forward."""

    def transpose_for_scores(x):
        x = x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size))
        return x.permute(0, 3, 1, 2, 4)

    query_layer = transpose_for_scores(self.query(hidden_states))
    key_layer = transpose_for_scores(self.key(hidden_states))
    value_layer = transpose_for_scores(self.value(hidden_states))
    query_layer = query_layer / math.sqrt(self.attention_head_size)
    attention_scores = natten2dqkrpb(query_layer, key_layer, self.rpb, self.kernel_size, self.dilation)
    attention_probs = torch.nn.functional.softmax(attention_scores, dim=-1)
    attention_probs = self.dropout(attention_probs)
    context_layer = natten2dav(attention_probs, value_layer, self.kernel_size, self.dilation)
    context_layer = context_layer.permute(0, 2, 3, 1, 4).contiguous()
    context_layer = context_layer.view(context_layer.size()[:-2] + (self.all_head_size,))
    return (context_layer, attention_probs) if output_attentions else (context_layer,)


# ----------------------------------------------------------------------------- models


CONFIGS = {
    # two stages, dilation 1 and 2; stage 2's 5x6 map is padded by HF to the 6x6 dilated window
    "k3": (
        dict(
            embed_dim=32,
            depths=[2, 2],
            num_heads=[2, 4],
            kernel_size=3,
            dilations=[[1, 2], [2, 1]],
            layer_scale_init_value=0.5,
        ),
        (40, 48),
    ),
    # kernel 5 with dilation 2 on an odd-sized 11x13 map: every border case of the sub-grids
    "k5": (dict(embed_dim=32, depths=[2], num_heads=[2], kernel_size=5, dilations=[[2, 1]]), (44, 52)),
}


def _models(name, cls="DinatModel"):
    mod = hfd.load_dinat()
    cfg_kw, size = CONFIGS[name]
    torch.manual_seed(0)
    cfg = transformers.DinatConfig(mlp_ratio=2.0, drop_path_rate=0.0, num_labels=3, **cfg_kw)
    ref = getattr(mod, cls)(cfg).double()
    with torch.no_grad():  # HF initialises the bias to zeros: make it count
        for m in ref.modules():
            if isinstance(m, mod.NeighborhoodAttention):
                m.rpb.normal_()
    ours = copy.deepcopy(ref)
    for m in ref.modules():
        if isinstance(m, mod.NeighborhoodAttention):
            m.forward = types.MethodType(reference_forward, m)
    hfd.use_dcal_neighborhood(ours)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return ref, ours, x


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=x)
    tensors = [out[k] for k in out.keys() if isinstance(out[k], torch.Tensor)]
    gen = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)
    loss.backward()
    return [t.detach() for t in tensors], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = dn.ops.neighborhood_attention2d

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), kw["kernel_size"], kw["dilation"], kw["border"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dn.ops, "neighborhood_attention2d", spy)
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dinat_forward_backward_equal_windowed_reference(name, fused_calls):
    ref, ours, x = _models(name)
    ref.train(), ours.train()
    ref_out, ref_grads = _loss_and_grads(ref, x)
    out, grads = _loss_and_grads(ours, x)
    assert len(out) == len(ref_out) >= 2
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape and (a - b).abs().max().item() <= TOL
    n_params = sum(1 for p in ours.parameters() if p.requires_grad)
    assert set(grads) == set(ref_grads) and len(grads) == n_params
    assert any(n.endswith("rpb") for n in grads)
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert worst <= TOL, worst
    cfg = CONFIGS[name][0]
    assert len(fused_calls) == sum(cfg["depths"])  # every layer ran the fused clamp op
    assert {c[3] for c in fused_calls} == {"clamp"}
    assert {c[2] for c in fused_calls} == {d for ds in cfg["dilations"] for d in ds}
    from dcal import ops

    q = torch.zeros(fused_calls[0][0], dtype=torch.float64)
    assert ops.chosen_backend("neighborhood_attention2d", q) == "cpp"


def test_converted_model_keeps_parameters_and_state_dict():
    mod = hfd.load_dinat()
    ref, _, x = _models("k3", cls="DinatForImageClassification")
    params = {n: p for n, p in ref.named_parameters()}
    sd_keys = list(ref.state_dict())
    ours = hfd.use_dcal_neighborhood(ref)
    assert ours is ref
    assert not any(isinstance(m, mod.NeighborhoodAttention) for m in ours.modules())
    assert sum(isinstance(m, hfd.DcalNeighborhoodAttention) for m in ours.modules()) == 4
    assert all(p is params[n] for n, p in ours.named_parameters())  # same tensors: an optimiser keeps working
    assert list(ours.state_dict()) == sd_keys
    assert ours(pixel_values=x).logits.shape == (2, 3)


def test_save_and_from_pretrained(tmp_path):
    hfd.load_dinat()
    _, ours, x = _models("k3")
    ours.eval().save_pretrained(tmp_path)  # a local folder: nothing downloaded
    loaded = hfd.use_dcal_neighborhood(transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float64)).eval()
    assert type(loaded).__name__ == "DinatModel"
    with torch.no_grad():
        a, b = ours(pixel_values=x).last_hidden_state, loaded(pixel_values=x).last_hidden_state
    assert torch.equal(a, b)


def test_output_attentions_and_dropout_run_the_windowed_math(fused_calls):
    ref, ours, x = _models("k5")
    ref.eval(), ours.eval()
    with torch.no_grad():
        a = ref(pixel_values=x, output_attentions=True).attentions
        b = ours(pixel_values=x, output_attentions=True).attentions
    assert len(a) == len(b) >= 1 and fused_calls == []
    for p, q in zip(a, b):
        assert p.shape == q.shape and (p - q).abs().max().item() <= TOL
    # attention dropout in training: the probabilities are needed, the fused op is not used
    for m in ours.modules():
        if isinstance(m, hfd.DcalNeighborhoodAttention):
            m.dropout.p = 0.5
    ours.train()
    ours(pixel_values=x).last_hidden_state.sum().backward()
    assert fused_calls == []
    ours.eval()
    with torch.no_grad():
        ours(pixel_values=x)
    assert len(fused_calls) == 2


def test_unconverted_model_and_bad_input_are_refused():
    mod = hfd.load_dinat()
    assert hfd.load_dinat() is mod  # idempotent
    cfg = transformers.DinatConfig(embed_dim=32, depths=[1], num_heads=[2], kernel_size=3, dilations=[[1]])
    model = mod.DinatModel(cfg)  # builds without the old NATTEN
    with pytest.raises(RuntimeError, match="use_dcal_neighborhood"):
        model(pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no HF DiNAT"):
        hfd.use_dcal_neighborhood(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        hfd.use_dcal_neighborhood(model, backend="nope")

    class Sub(mod.NeighborhoodAttention):
        pass

    with pytest.raises(TypeError, match="subclass"):
        hfd.use_dcal_neighborhood(Sub(cfg, 32, 2, 3, 1))
    att = hfd.use_dcal_neighborhood(mod.NeighborhoodAttention(cfg, 32, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\[B, X, Y, 32\]"):
        att(torch.randn(1, 5, 5, 16))


def test_models_build_without_natten():
    """Without NATTEN HF's constructors call requires_backends(self, ["natten"]) and raise; after
    load_dinat() that check skips "natten" (and still checks anything else)."""
    mod = hfd.load_dinat()
    seen = []

    def original(obj, backends):
        seen.append(list(backends))
        if "natten" in backends or "nope" in backends:
            raise ImportError(f"{backends} missing")

    wrapped = dn._requires_backends_without_natten(original)
    wrapped(object(), ["natten"])
    wrapped(object(), "natten")
    with pytest.raises(ImportError, match="nope"):
        wrapped(object(), ["natten", "nope"])
    assert seen == [["nope"]]
    assert getattr(mod.requires_backends, "_dcal_wrapped", False)
