"""dcal.nn.PWCAAttention against a plain, materialising timm-style attention module."""

import pytest
import torch
import torch.nn.functional as F

from dcal.nn import PWCAAttention
from dcal.ops._dispatch import Call, choose
from dcal.testing import assert_close_to_reference

# (dtype, atol, rtol); bf16 is judged against the plain module's own bf16 error instead.
pytestmark = pytest.mark.usefixtures("one_thread")


TOLS = [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-5, 2e-5)]
# (dim, heads, N target tokens, Np pair tokens): odd token counts, head dims 16 and 40.
SHAPES = [(32, 2, 13, 7), (80, 2, 9, 17)]
SHAPE_IDS = [f"C{c}-H{h}-N{n}-Np{p}" for c, h, n, p in SHAPES]


def timm_state_dict(dim, bias=True, seed=0):
    """The parameters of timm's ViT ``Attention`` (qkv, proj; q_norm/k_norm hold none)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "qkv.weight": torch.randn(3 * dim, dim, generator=g) * dim**-0.5,
        "proj.weight": torch.randn(dim, dim, generator=g) * dim**-0.5,
        "proj.bias": torch.randn(dim, generator=g) * 0.1,
    }
    if bias:
        sd["qkv.bias"] = torch.randn(3 * dim, generator=g) * 0.1
    return sd


def plain_attention(sd, heads, x, kv_tokens, drop=None):
    """timm's non-fused Attention.forward with queries from x and keys/values from kv_tokens."""
    B, N, C = x.shape
    D = C // heads
    w, b = sd["qkv.weight"], sd.get("qkv.bias")
    qkv_x = F.linear(x, w, b).view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
    qkv_kv = F.linear(kv_tokens, w, b).view(B, kv_tokens.shape[1], 3, heads, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_x[0], qkv_kv[1], qkv_kv[2]
    s = (q * D**-0.5) @ k.transpose(-2, -1)
    p = s.softmax(-1)
    if drop is not None:
        p = drop(p)
    out = (p @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, sd["proj.weight"], sd["proj.bias"]), q, k, torch.logsumexp(s.double(), -1)


def _need(backend, dtype):
    if backend is None:
        return
    try:
        choose(Call("multi_kv_attention", torch.device("cpu"), dtype, 16), backend)
    except ValueError as e:
        pytest.skip(str(e))


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, tensors, g)


def _run_both(backend, dtype, shape, with_pair, query_index=False):
    """Module and plain outputs and gradients (x, pair, qkv.weight, qkv.bias, proj.weight)."""
    C, H, N, Np = shape
    sd = {k: v.to(dtype) for k, v in timm_state_dict(C).items()}
    m = PWCAAttention(C, H, qkv_bias=True, backend=backend).to(dtype)
    m.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, N, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    pair = torch.randn(2, Np, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if with_pair else None
    idx = torch.stack([torch.randperm(N, generator=g)[:5] for _ in range(2)]) if query_index else None
    out = m(x, pair=pair, query_index=idx)
    leaves = [x] + ([pair] if with_pair else [])
    mods = [m.qkv.weight, m.qkv.bias, m.proj.weight]
    got = [out] + list(_grads(out, leaves + mods))
    sdr = {k: v.detach().clone().requires_grad_() for k, v in sd.items()}
    xr = x.detach().clone().requires_grad_()
    pr = pair.detach().clone().requires_grad_() if with_pair else None
    ref = plain_attention(sdr, H, xr, xr if pr is None else torch.cat([xr, pr], 1))[0]
    if idx is not None:
        ref = ref.gather(1, idx[..., None].expand(-1, -1, C))
    want = [ref] + list(
        _grads(ref, [xr] + ([pr] if with_pair else []) + [sdr["qkv.weight"], sdr["qkv.bias"], sdr["proj.weight"]])
    )
    return got, want


NAMES = ["out", "dx", "dpair", "dqkv_w", "dqkv_b", "dproj_w"]


def _names(with_pair):
    return [n for n in NAMES if with_pair or n != "dpair"]


@pytest.mark.parametrize("backend", [None, "sdpa", "reference", "triton"], ids=lambda b: f"backend-{b}")
@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mode", ["self", "pwca", "glca_queries"])
def test_matches_plain_attention(backend, dtype, atol, rtol, shape, mode):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp16/bf16/fp32")
    _need(backend, dtype)
    with_pair = mode == "pwca"
    got, want = _run_both(backend, dtype, shape, with_pair, query_index=mode == "glca_queries")
    for name, a, b in zip(_names(with_pair), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", [None, "reference"], ids=lambda b: f"backend-{b}")
@pytest.mark.parametrize("mode", ["self", "pwca"])
def test_bf16_error_within_plain_bf16_error(backend, mode):
    """Forward error at most 2x, gradient errors at most 3x the plain module's own bf16 error."""
    shape = SHAPES[0]
    with_pair = mode == "pwca"
    got, _ = _run_both(backend, torch.bfloat16, shape, with_pair)
    lp, ref32 = (
        _run_both("reference", torch.bfloat16, shape, with_pair)[1],
        _run_both("reference", torch.float32, shape, with_pair)[1],
    )
    for i, (name, a, b, r) in enumerate(zip(_names(with_pair), got, lp, ref32)):
        assert_close_to_reference(name, a.float(), r, b.float(), dtype=torch.bfloat16, grad=i > 0)


def test_timm_state_dict_round_trip():
    m = PWCAAttention(32, 2, qkv_bias=True)
    sd = timm_state_dict(32)
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.qkv.weight, sd["qkv.weight"]) and torch.equal(m.proj.bias, sd["proj.bias"])
    assert set(PWCAAttention(32, 2).state_dict()) == set(sd) - {"qkv.bias"}  # timm's qkv_bias=False


def test_pwca_equals_attention_over_concatenated_tokens():
    """pair tokens enter only as keys/values, projected with the same weights."""
    torch.manual_seed(0)
    m = PWCAAttention(32, 4, qkv_bias=True).double()
    x, pair = torch.randn(3, 11, 32, dtype=torch.float64), torch.randn(3, 6, 32, dtype=torch.float64)
    out = m(x, pair=pair)
    ref = plain_attention(dict(m.state_dict()), 4, x, torch.cat([x, pair], 1))[0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, m(x)), "the pair must change the output"


def test_return_rollout_gives_views_and_lse():
    torch.manual_seed(0)
    m = PWCAAttention(32, 2, qkv_bias=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, (q, k, lse) = m(x, return_rollout=True)
    _, q_ref, k_ref, lse_ref = plain_attention(dict(m.state_dict()), 2, x, x)
    torch.testing.assert_close(y, m(x), atol=0, rtol=0)
    torch.testing.assert_close(q, q_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k, k_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)
    # Views of the one qkv projection: no copies are made for the rollout.
    assert q._base is not None and q._base is k._base


def test_pair_kv_equals_projecting_the_pair():
    """pair_kv: the pair's keys/values as return_kv gives them for the pair's own self-attention;
    the output and every gradient are those of passing the pair's tokens."""
    torch.manual_seed(0)
    m = PWCAAttention(32, 4, qkv_bias=True).double()
    x0, p0 = torch.randn(3, 11, 32, dtype=torch.float64), torch.randn(3, 6, 32, dtype=torch.float64)
    res = []
    for use_kv in (False, True):
        m.zero_grad(set_to_none=True)
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        if use_kv:
            y_p, (k, v) = m(p, return_kv=True)
            out = m(x, pair_kv=(k, v))
        else:
            y_p, out = m(p), m(x, pair=p)
        (out * torch.cos(out)).sum().add((y_p * y_p).sum()).backward()
        res.append([out, x.grad, p.grad] + [t.grad for t in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_return_kv_gives_views_of_the_projection():
    torch.manual_seed(0)
    m = PWCAAttention(32, 2, qkv_bias=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, (q, k, lse), (k2, v) = m(x, return_rollout=True, return_kv=True)
    _, _, k_ref, _ = plain_attention(dict(m.state_dict()), 2, x, x)
    torch.testing.assert_close(y, m(x), atol=0, rtol=0)
    assert k2 is k or torch.equal(k2, k)
    torch.testing.assert_close(k2, k_ref, atol=1e-12, rtol=1e-12)
    w, b = m.qkv.weight[64:], m.qkv.bias[64:]
    v_ref = torch.nn.functional.linear(x, w, b).view(2, 9, 2, 16).transpose(1, 2)
    torch.testing.assert_close(v, v_ref, atol=1e-12, rtol=1e-12)
    assert v._base is q._base, "v must be a view of the qkv projection, not a copy"


def test_attn_dropout_is_applied_in_training():
    torch.manual_seed(0)
    m = PWCAAttention(32, 2, qkv_bias=True, attn_drop=0.5).double()
    x, pair = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    sd = dict(m.state_dict())
    m.train()
    torch.manual_seed(7)
    out = m(x, pair=pair)
    torch.manual_seed(7)
    ref = plain_attention(sd, 2, x, torch.cat([x, pair], 1), drop=torch.nn.Dropout(0.5))[0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    no_drop = plain_attention(sd, 2, x, torch.cat([x, pair], 1))[0]
    assert (out - no_drop).abs().max() > 1e-3, "dropout was ignored in training"
    m.eval()
    torch.testing.assert_close(m(x, pair=pair), no_drop, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m(torch.randn(2, 5, 16)), "x must be"),
        (lambda m: m(torch.randn(2, 5)), "x must be"),
        (lambda m: m(torch.randn(2, 5, 32), pair=torch.randn(3, 5, 32)), "pair must be"),
        (lambda m: m(torch.randn(2, 5, 32), pair=torch.randn(2, 5, 16)), "pair must be"),
        (lambda m: m(torch.randn(2, 5, 32), query_index=torch.tensor([[0, 5], [1, 2]])), "query_index"),
        (lambda m: m(torch.randn(2, 5, 32), query_index=torch.zeros(2, 2)), "query_index"),
        (lambda m: m(torch.randn(2, 5, 32), pair=torch.randn(2, 5, 32), return_rollout=True), "return_rollout"),
        (lambda m: m(torch.randn(2, 5, 32), pair_kv=torch.randn(2, 2, 5, 16)), "pair_kv must be a pair"),
        (lambda m: m(torch.randn(2, 5, 32), pair_kv=(torch.randn(2, 2, 5, 8),) * 2), r"pair_kv\[0\] \(k2\) must be"),
        (lambda m: m(torch.randn(2, 5, 32), pair_kv=(torch.randn(3, 2, 5, 16),) * 2), r"pair_kv\[0\] \(k2\) must be"),
        (
            lambda m: m(torch.randn(2, 5, 32), pair_kv=(torch.randn(2, 2, 5, 16), torch.randn(2, 3, 5, 16))),
            r"pair_kv\[1\] \(v2\) must be",
        ),
        (
            lambda m: m(torch.randn(2, 5, 32), pair_kv=(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 4, 16))),
            "as many tokens",
        ),
        (
            lambda m: m(torch.randn(2, 5, 32), pair=torch.randn(2, 5, 32), pair_kv=(torch.randn(2, 2, 5, 16),) * 2),
            "not both",
        ),
        (
            lambda m: m(torch.randn(2, 5, 32), pair_kv=(torch.randn(2, 2, 5, 16),) * 2, return_rollout=True),
            "return_rollout",
        ),
    ],
    ids=[
        "x-width",
        "x-rank",
        "pair-batch",
        "pair-width",
        "index-range",
        "index-dtype",
        "rollout-with-pair",
        "pair_kv-not-a-pair",
        "pair_kv-head-dim",
        "pair_kv-batch",
        "pair_kv-heads",
        "pair_kv-lengths",
        "pair-and-pair_kv",
        "rollout-with-pair_kv",
    ],
)
def test_bad_input_raises(call, match):
    m = PWCAAttention(32, 2)
    with pytest.raises(ValueError, match=match):
        call(m)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="num_heads"):
        PWCAAttention(30, 4)
    with pytest.raises(ValueError, match="backend"):
        PWCAAttention(32, 2, backend="cuda")
