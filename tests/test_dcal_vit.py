"""DCAL ViT on a tiny config: against a plain, materialising ViT written here, across backends,
with checkpointing, the loss, a short training run and the JAX npz loader."""

import contextlib
import functools
import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dcal.models import DCALConfig, DCALViT
from dcal.models.dcal_vit import derangement
from dcal.testing import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, glca_ratio=0.25, drop_path_rate=0.0
)  # 16 patches + CLS, D 16, R 4


def tiny(ablation="full", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return DCALViT(DCALConfig(**{**TINY, "ablation": ablation, **kw})).to(dtype)


def images(B=3, seed=1, dtype=torch.float64):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- plain ViT


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-6)


def plain_block(sd, pre, x, heads, pair=None, query_index=None):
    """timm pre-norm block, materialising; returns (tokens, head-mean attention [B, Nq, Nk])."""
    B, N, C = x.shape
    D = C // heads
    h = _ln(sd, pre + "norm1", x)
    kvt = h if pair is None else torch.cat([h, _ln(sd, pre + "norm1", pair)], 1)
    qkv = lambda t: (
        F.linear(t, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
        .view(B, t.shape[1], 3, heads, D)
        .permute(2, 0, 3, 1, 4)
    )
    q, (_, k, v) = qkv(h)[0], qkv(kvt)
    if query_index is not None:
        q = q.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, D))
        x = x.gather(1, query_index[..., None].expand(-1, -1, C))
    p = ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = x + F.linear(
        (p @ v).transpose(1, 2).reshape(B, -1, C), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"]
    )
    m = F.gelu(F.linear(_ln(sd, pre + "norm2", x), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + F.linear(m, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"]), p.mean(1)


def plain_forward(model, x, perm=None):
    """All branches of the DCAL ViT, written out densely (dense rollout included)."""
    c, sd = model.config, dict(model.named_parameters())
    t = (
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=c.patch_size)
        .flatten(2)
        .transpose(1, 2)
    )
    h0 = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]
    h, hidden, roll = h0, [], None
    for i in range(c.depth):
        hidden.append(h)
        h, a = plain_block(sd, f"blocks.{i}.", h, c.num_heads)
        S = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        roll = S if roll is None else S @ roll
    head = lambda f: F.linear(_ln(sd, "norm", f), sd["head.weight"], sd["head.bias"])
    out = {"sa": head(h[:, 0])}
    idx = None
    if "glca" in c.branches:
        top = roll[:, 0, 1:].topk(c.num_local_queries, dim=1).indices + 1
        idx = torch.cat([torch.zeros_like(top[:, :1]), top], 1)
        g, _ = plain_block(sd, "glca_block.", hidden[-1], c.num_heads, query_index=idx)
        out["glca"] = F.linear(_ln(sd, "glca_norm", g).mean(1), sd["glca_head.weight"], sd["glca_head.bias"])
    if perm is not None:
        p = h0
        for i in range(c.depth):
            p, _ = plain_block(sd, f"blocks.{i}.", p, c.num_heads, pair=hidden[i][perm])
        out["pwca"] = head(p[:, 0])
    return out, idx


PERM = torch.tensor([2, 0, 1])


def test_state_dict_has_timm_vit_names():
    keys = set(tiny("sa").state_dict())
    for k in [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "blocks.1.norm2.bias",
        "norm.weight",
        "head.weight",
    ]:
        assert k in keys
    assert not any(k.startswith("glca") for k in keys) and "loss_weights" not in keys


@pytest.mark.parametrize("ablation", ["sa", "sa_glca", "full"])
def test_branches_match_plain_vit(ablation):
    """SA equals a plain ViT; GLCA and PWCA equal their dense definitions with the same weights."""
    m = tiny(ablation).train()
    x = images()
    out = m(x, perm=PERM)
    ref, _ = plain_forward(m, x, PERM if ablation == "full" else None)
    assert set(out) == set(m.config.branches)
    for k in out:
        torch.testing.assert_close(out[k], ref[k], atol=1e-10, rtol=1e-10, msg=lambda s: f"{k}: {s}")


def test_glca_selects_top_r_of_dense_rollout(monkeypatch):
    m = tiny("sa_glca").eval()
    x = images(B=4, seed=5)
    seen = []
    real = m.glca_index
    monkeypatch.setattr(m, "glca_index", lambda stats: seen.append(real(stats)) or seen[-1])
    m(x)
    _, want = plain_forward(m, x)
    assert seen[0].shape == (4, 1 + math.ceil(0.25 * 16))
    assert torch.equal(seen[0], want), f"{seen[0]} vs {want}"


def _need(backend, dtype):
    if backend in (None, "reference"):
        return
    from dcal.ops._dispatch import Call, choose

    ops = ["multi_kv_attention"] + ([] if backend == "sdpa" else ["attention_rollout"])  # sdpa: automatic rollout
    for op in ops:
        try:
            choose(Call(op, torch.device("cpu"), dtype, 16), backend)
        except ValueError as e:
            pytest.skip(str(e))


# (backend, dtype, atol, rtol): fp64 where the backend takes it; Triton (interpreter) in fp32.
BACKEND_TOLS = [
    (None, torch.float64, 1e-10, 1e-9),
    ("sdpa", torch.float64, 1e-10, 1e-9),
    ("triton", torch.float32, 1e-5, 1e-4),
]


@pytest.mark.parametrize("backend,dtype,atol,rtol", BACKEND_TOLS, ids=["default-fp64", "sdpa-fp64", "triton-fp32"])
@pytest.mark.parametrize("ablation", ["sa_glca", "full"])
def test_reference_and_default_backend_agree(ablation, backend, dtype, atol, rtol):
    _need(backend, dtype)
    x, y = images(dtype=dtype), torch.tensor([0, 3, 1])
    res = []
    for b in ("reference", backend):
        m = tiny(ablation, backend=b, dtype=dtype).train()
        out = m(x, perm=PERM)
        loss, _ = m.loss(out, y)
        loss.backward()
        res.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (o1, g1), (o2, g2) = res
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], atol=atol, rtol=rtol, msg=lambda s: f"logits {k}: {s}")
    assert g1.keys() == g2.keys()
    for n in g1:
        assert g1[n] is not None, f"{n} got no gradient"
        torch.testing.assert_close(g2[n], g1[n], atol=atol, rtol=rtol, msg=lambda s: f"grad {n}: {s}")


# Triton on CPU runs in the interpreter, whose bf16 tl.dot is wrong (triton 3.8): fp16 there.
@pytest.mark.parametrize(
    "backend,dtype",
    [(None, torch.bfloat16), ("triton", torch.float16)],
    ids=["backend-None-bf16", "backend-triton-fp16"],
)
def test_autocast_error_within_reference_error(backend, dtype):
    """Under low-precision autocast the logits' error vs fp32 is at most 2x that of the reference backend."""
    _need(backend, torch.float32)
    x = images(dtype=torch.float32)
    ref32 = tiny(dtype=torch.float32, backend="reference").train()(x, perm=PERM)
    got = {}
    for b in ("reference", backend):
        with torch.autocast("cpu", dtype=dtype):
            got[b] = tiny(dtype=torch.float32, backend=b).train()(x, perm=PERM)
    for k in ref32:
        assert_close_to_reference(
            k, got[backend][k].float(), ref32[k], got["reference"][k].float(), dtype=dtype, grad=False
        )


def test_pwca_and_glca_use_sa_weights():
    """One SA weight moves every branch; a GLCA weight moves only GLCA."""
    m = tiny().train()
    x = images()
    base = {k: v.detach() for k, v in m(x, perm=PERM).items()}
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight[0, 0] += 0.5
    moved = m(x, perm=PERM)
    for k in ("sa", "glca", "pwca"):
        assert (moved[k] - base[k]).abs().max() > 1e-6, f"branch {k} ignores the SA weights"
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight[0, 0] -= 0.5
        m.glca_block.mlp.fc2.bias[0] += 0.5  # one channel: a uniform shift would vanish in the LayerNorm
    moved = m(x, perm=PERM)
    assert torch.allclose(moved["sa"], base["sa"], atol=1e-12) and torch.allclose(
        moved["pwca"], base["pwca"], atol=1e-12
    )
    assert (moved["glca"] - base["glca"]).abs().max() > 1e-6


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_pairing_has_no_fixed_points(n):
    torch.manual_seed(0)
    for _ in range(50):
        p = derangement(n)
        assert sorted(p.tolist()) == list(range(n))
        assert n == 1 or not bool((p == torch.arange(n)).any())


def test_random_pairing_is_a_derangement():
    m = tiny().train()
    x = images(B=4)
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    perm = derangement(4)
    ref, _ = plain_forward(m, x, perm)
    torch.testing.assert_close(out["pwca"], ref["pwca"], atol=1e-10, rtol=1e-10)


def test_grad_checkpointing_matches():
    x, y = images(), torch.tensor([1, 2, 3])
    res = []
    for ckpt in (False, True):
        m = tiny(drop_path_rate=0.2).train()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(11)  # same pairing and drop-path masks in both runs
        out = m(x)
        m.loss(out, y)[0].backward()
        res.append((out, [p.grad for p in m.parameters()]))
    for k in res[0][0]:
        torch.testing.assert_close(res[1][0][k], res[0][0][k], atol=1e-12, rtol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def _forward_projecting_the_pair(m, x, perm):
    """The model's training forward written the direct way: PWCA block l projects the pair's
    tokens h_{l-1}[perm] again (norm1 and qkv) instead of taking the SA pass's keys/values."""
    h = h0 = m.embed(x)
    hidden, stats = [], []
    for blk in m.blocks:
        hidden.append(h)
        h, st = blk(h, return_rollout=True)
        stats.append(st)
    out = {"sa": m.head(m.norm(h)[:, 0])}
    g = m.glca_block(hidden[-1], query_index=m.glca_index(stats))
    out["glca"] = m.glca_head(m.glca_norm(g).mean(dim=1))
    p = h0
    for blk, hs in zip(m.blocks, hidden):
        p = blk(p, pair=hs[perm])
    out["pwca"] = m.head(m.norm(p)[:, 0])
    return out


def _storage_ref(t):
    """A weak reference to t's memory (alive while any view of it, e.g. a saved one, is)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


def _loss_and_grads(m, forward, x, y):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same drop-path masks
    out = forward(x)
    loss = m.loss(out, y)[0]
    loss.backward()
    return [loss] + [out[k] for k in sorted(out)] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("options", [{}, {"checkpoint_mlp": True}, {"grad_checkpointing": True}], ids=str)
def test_pair_keys_values_from_the_sa_pass_match_projecting_the_pair(options):
    """PWCA's pair keys/values taken from the SA pass (and re-gathered in backward) give the loss,
    logits and gradients of projecting the pair's tokens again (fp64; the gradient sums differ in
    order only)."""
    x, y, perm = images(), torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1])
    m = tiny(drop_path_rate=0.2, **options).train()
    ref = _loss_and_grads(m, lambda x: _forward_projecting_the_pair(m, x, perm), x, y)
    got = _loss_and_grads(m, lambda x: m(x, perm=perm), x, y)
    assert all(g is not None for g in got)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_checkpoint_mlp_is_bitwise_the_same_step():
    """checkpoint_mlp recomputes LayerNorm and GELU in backward: the same loss and gradients, bit
    for bit (fp32), with the GELU's output no longer kept between forward and backward."""
    x, y = images(dtype=torch.float32), torch.tensor([1, 2, 3])
    res, kept = [], []
    for ckpt in (False, True):
        m = tiny(dtype=torch.float32, drop_path_rate=0.2, checkpoint_mlp=ckpt).train()
        outs = []
        m.blocks[0].mlp.act.register_forward_hook(lambda mod, a, o: outs.append(_storage_ref(o)))
        m.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = m(x, perm=torch.tensor([1, 2, 0]))
        loss = m.loss(out, y)[0]
        gc.collect()
        kept.append(sum(not r.expired() for r in outs))  # SA and PWCA pass of block 0
        loss.backward()
        res.append([loss] + [p.grad for p in m.parameters()])
    assert kept == [2, 0], kept
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_pair_copies_are_not_kept_for_backward(monkeypatch):
    """The pair's gathered keys/values live only during their PWCA block's forward."""
    import dcal.models.dcal_vit as dv

    made = []
    gather = dv._gather_batch

    def recording(t, index):
        out = gather(t, index)
        if torch.is_grad_enabled():  # the forward's copies, not backward's re-gathers
            made.append(_storage_ref(out))
        return out

    monkeypatch.setattr(dv, "_gather_batch", recording)
    m = tiny().train()
    x, y = images(), torch.tensor([1, 2, 3])
    loss = m.loss(m(x, perm=torch.tensor([2, 0, 1])), y)[0]
    gc.collect()
    assert len(made) == 2 * m.config.depth
    assert all(r.expired() for r in made), "a gathered pair copy is kept alive by the graph"
    loss.backward()
    assert all(p.grad is not None for p in m.blocks.parameters())


class _LiveStorages(TorchDispatchMode):
    """The storages of every tensor made under it that are still alive (by weak reference)."""

    def __init__(self):
        super().__init__()
        self.live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live:
                    self.live[key] = (weakref.ref(st, lambda _, k=key: self.live.pop(k, None)), str(func), t.shape)
        return out


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
def test_nothing_outlives_the_step(backend):
    """After forward and backward only the gradients remain: no node of the graph (e.g. the
    logsumexp of a reference attention whose lse is dropped) is kept alive by the saved-tensor
    hooks of the PWCA pass."""
    m = tiny(backend=backend).train()
    x, y = images(), torch.tensor([1, 2, 3])
    tr = _LiveStorages()
    with tr:
        loss = m.loss(m(x, perm=torch.tensor([2, 0, 1])), y)[0]
        loss.backward()
    del loss
    gc.collect()
    kept = {t.untyped_storage().data_ptr() for p in m.parameters() for t in (p, p.grad) if t is not None}
    left = [
        (func, tuple(shape))
        for ref, func, shape in tr.live.values()
        if ref() is not None and ref().data_ptr() not in kept and len(shape) > 0
    ]
    assert not left, left


def test_remake_saved_gives_the_same_gradients():
    """_RemakeSaved: a saved gathered tensor is dropped in forward and made again in backward."""
    from dcal.models.dcal_vit import _gather_batch, _RemakeSaved

    k = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([2, 0, 1])
    grads = []
    for remake in (False, True):
        k.grad = None
        g = _gather_batch(k, idx)
        ref = _storage_ref(g)
        hooks = _RemakeSaved([(g, functools.partial(_gather_batch, k.detach(), idx))]) if remake else None
        with hooks or contextlib.nullcontext():
            y = (g[:, :, 1:] * g[:, :, :-1]).exp().sum()  # saves views of g
        del g
        gc.collect()
        assert ref.expired() == remake
        y.backward()
        grads.append(k.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "perm,match",
    [
        (torch.tensor([1, 0]), r"perm must be an int64 tensor \[B\] = \[3\]"),
        (torch.tensor([1.0, 2.0, 0.0]), "perm must be an int64"),
        ([1, 2, 0], "perm must be an int64"),
        (torch.tensor([1, 2, 3]), r"perm values must lie in \[0, 3\)"),
    ],
    ids=["length", "dtype", "list", "range"],
)
def test_bad_pairing_raises(perm, match):
    with pytest.raises(ValueError, match=match):
        tiny().train()(images(), perm=perm)


@pytest.mark.parametrize("ablation,total", [("sa", 1.0), ("sa_glca", 2.0), ("full", 2.0)])
def test_eval_returns_probabilities(ablation, total):
    m = tiny(ablation).eval()
    with torch.no_grad():
        p = m(images(B=2))
    assert p.shape == (2, 5) and bool((p >= 0).all())
    torch.testing.assert_close(p.sum(-1), torch.full((2,), total, dtype=p.dtype), atol=1e-12, rtol=0)


def test_loss_is_uncertainty_weighted_and_clamped():
    m = tiny().train()
    out, y = m(images(), perm=PERM), torch.tensor([0, 1, 2])
    with torch.no_grad():
        m.loss_weights.copy_(torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64))
    loss, parts = m.loss(out, y)
    want = sum(math.exp(-s) * F.cross_entropy(out[b], y) + s for b, s in zip(("sa", "glca", "pwca"), (0.3, -0.7, 1.1)))
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    lo, hi = m.config.logvar_clamp
    with torch.no_grad():
        m.loss_weights.copy_(torch.tensor([hi + 5, lo - 5, 0.0]))
    loss, parts = m.loss(out, y)
    assert parts["logvar_sa"] == hi and parts["logvar_glca"] == lo
    # A large lr pushes the log-variances towards -inf (tiny CE): they must stop at the bound.
    opt = torch.optim.SGD([m.loss_weights], lr=50.0)
    for _ in range(5):
        opt.zero_grad()
        loss, parts = m.loss({k: v.detach() * 20 for k, v in out.items()}, y)
        loss.backward()
        opt.step()
        for b in ("sa", "glca", "pwca"):
            assert lo <= parts[f"logvar_{b}"] <= hi
    assert bool(((m.loss_weights >= lo) & (m.loss_weights <= hi)).all())
    # Two micro-batches before one backward: the projection must not invalidate the first graph.
    (m.loss(out, y)[0] + m.loss({k: v * 2 for k, v in out.items()}, y)[0]).backward()
    assert m.loss_weights.grad is not None
    plain = tiny("sa").train()
    o = plain(images())
    torch.testing.assert_close(plain.loss(o, y)[0], F.cross_entropy(o["sa"], y))


def test_no_weight_decay_names_exist():
    m = tiny()
    names = dict(m.named_parameters())
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "loss_weights"}
    assert m.no_weight_decay() <= set(names)


def test_tiny_model_learns_synthetic_task():
    """4 classes, each a fixed pattern plus noise: the summed CE must fall by more than 60% in 30 steps."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.arange(8) % 4
    x = protos[y] + 0.5 * torch.randn(8, 3, 32, 32, generator=g)
    m = tiny(dtype=torch.float32, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    ces = []
    for _ in range(30):
        loss, parts = m.loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ces.append(sum(parts[f"ce_{b}"].item() for b in ("sa", "glca", "pwca")))
    first, last = np.mean(ces[:3]), np.mean(ces[-3:])
    assert last < 0.4 * first, f"summed CE fell only from {first:.3f} to {last:.3f}"


def test_bad_input_and_config_raise():
    m = tiny("sa")
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 48, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="ablation"):
        DCALConfig(ablation="pwca")
    with pytest.raises(ValueError, match="patch_size"):
        DCALConfig(img_size=100)
    with pytest.raises(ValueError, match="backend"):
        DCALConfig(backend="gpu")
    with pytest.raises(ValueError, match="logvar_clamp"):
        DCALConfig(logvar_clamp=(1.0, -1.0))
    with pytest.raises(TypeError, match="outputs"):
        m.loss(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64))


# ----------------------------------------------------------------------------- npz


def jax_arrays(grid=4, C=32, H=2, p=8, depth=2, mlp=128, seed=0):
    """Random weights in the key layout and shapes of the JAX ViT-B_16.npz release."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    a = {
        "embedding/kernel": r(p, p, 3, C),
        "embedding/bias": r(C),
        "cls": r(1, 1, C),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, C),
        "Transformer/encoder_norm/scale": 1 + r(C),
        "Transformer/encoder_norm/bias": r(C),
        "head/kernel": r(C, 1000),
        "head/bias": r(1000),
    }
    for i in range(depth):
        b, att = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            a[f"{att}{n}/kernel"], a[f"{att}{n}/bias"] = r(C, H, C // H), r(H, C // H)
        a[att + "out/kernel"], a[att + "out/bias"] = r(H, C // H, C), r(C)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{b}{ln}/scale"], a[f"{b}{ln}/bias"] = 1 + r(C), r(C)
        a[b + "MlpBlock_3/Dense_0/kernel"], a[b + "MlpBlock_3/Dense_0/bias"] = r(C, mlp), r(mlp)
        a[b + "MlpBlock_3/Dense_1/kernel"], a[b + "MlpBlock_3/Dense_1/bias"] = r(mlp, C), r(C)
    return a


def jax_forward(a, x, depth=2):
    """The JAX ViT on the npz arrays in their own layouts (NHWC conv, [in, out] kernels)."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    k = t["embedding/kernel"]
    p = k.shape[0]
    B, _, Hh, W = x.shape
    patches = x.permute(0, 2, 3, 1).reshape(B, Hh // p, p, W // p, p, 3)
    h = torch.einsum("biujvc,uvco->bijo", patches, k).reshape(B, -1, k.shape[-1]) + t["embedding/bias"]
    h = torch.cat([t["cls"].expand(B, -1, -1), h], 1) + t["Transformer/posembed_input/pos_embedding"]
    ln = lambda z, n: F.layer_norm(z, z.shape[-1:], t[n + "/scale"], t[n + "/bias"], 1e-6)
    for i in range(depth):
        b, att = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        z = ln(h, b + "LayerNorm_0")
        q, kk, v = (
            torch.einsum("bnc,chd->bhnd", z, t[f"{att}{n}/kernel"]) + t[f"{att}{n}/bias"][None, :, None]
            for n in ("query", "key", "value")
        )
        o = ((q * q.shape[-1] ** -0.5) @ kk.transpose(-2, -1)).softmax(-1) @ v
        h = h + torch.einsum("bhnd,hdc->bnc", o, t[att + "out/kernel"]) + t[att + "out/bias"]
        z = F.gelu(ln(h, b + "LayerNorm_2") @ t[b + "MlpBlock_3/Dense_0/kernel"] + t[b + "MlpBlock_3/Dense_0/bias"])
        h = h + z @ t[b + "MlpBlock_3/Dense_1/kernel"] + t[b + "MlpBlock_3/Dense_1/bias"]
    return ln(h, "Transformer/encoder_norm")[:, 0]


def test_npz_loads_into_an_equivalent_model(tmp_path):
    a = jax_arrays()
    np.savez(tmp_path / "vit.npz", **a)
    m = tiny("sa")
    m.load_npz(str(tmp_path / "vit.npz"))
    x = images()
    logits = m.train()(x)["sa"]
    want = F.linear(jax_forward(a, x), m.head.weight, m.head.bias)
    torch.testing.assert_close(logits, want, atol=1e-9, rtol=1e-9)


def test_npz_resizes_pos_grid_and_copies_glca(tmp_path):
    a = jax_arrays(grid=2)
    # Rows of the 2x2 grid differ, columns are equal: the resized grid must keep that orientation.
    pos = a["Transformer/posembed_input/pos_embedding"]
    pos[0, 1:] = np.repeat(np.array([1.0, 3.0], np.float32), 2)[:, None] * np.ones((1, 32), np.float32)
    np.savez(tmp_path / "vit.npz", **a)
    m = tiny("full")
    m.load_npz(str(tmp_path / "vit.npz"))
    got = m.pos_embed.detach()
    assert torch.equal(got[0, 0], torch.from_numpy(pos[0, 0]).double())
    grid = got[0, 1:].reshape(4, 4, 32)
    assert torch.allclose(grid, grid[:, :1]), "columns of the resized grid must stay equal"
    assert grid[0, 0, 0] < grid[3, 0, 0]
    img = torch.from_numpy(pos[0, 1:]).reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    want = F.interpolate(img, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(grid, want[0].permute(1, 2, 0).double(), atol=1e-6, rtol=1e-6)
    last, glca = m.blocks[-1].state_dict(), m.glca_block.state_dict()
    assert all(torch.equal(last[k], glca[k]) for k in last)
    assert torch.equal(m.glca_norm.weight, m.norm.weight)


@pytest.mark.parametrize(
    "edit,key",
    [
        ("drop", "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"),
        ("drop", "cls"),
        ("shape", "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"),
        ("shape", "embedding/kernel"),
    ],
    ids=["missing-mlp-bias", "missing-cls", "shape-query", "shape-embedding"],
)
def test_npz_errors_name_the_key(tmp_path, edit, key):
    a = jax_arrays()
    if edit == "drop":
        del a[key]
    else:
        a[key] = a[key][..., :-1]
    np.savez(tmp_path / "vit.npz", **a)
    with pytest.raises(ValueError, match=key.replace("/", ".")):
        tiny("sa").load_npz(str(tmp_path / "vit.npz"))


def test_train_step_bench_providers_agree(monkeypatch):
    """bench/train_step.py (quick case): both providers run one step of the same model and loss."""
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ lives at the root
    import bench.train_step as ts

    case = ts.cases(True, "cpu")[0]
    inputs = ts.make_inputs(case)
    losses = [ts.PROVIDERS[name](case, inputs)() for name in ("materialising", "fused")]
    assert bool(torch.isfinite(losses[0]))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
