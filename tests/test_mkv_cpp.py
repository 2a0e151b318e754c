"""The "cpp" backend of multi_kv_attention (csrc/mkv_cpu.cpp): a FlashAttention-2 CPU kernel over
one or two key/value segments, checked against the reference (out, lse and every gradient,
including a loss on lse), plus opcheck and gradcheck (torch.compile: tests/test_compile.py)."""

import pytest
import torch

from dcal import _ext, ops
from dcal.ops import reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C not built")

if _ext.HAS_EXTENSION:
    from dcal.ops import _cpp_mkv

SHAPES = [  # (B, H, Nq, Nk1, Nk2 or None, D): odd sizes, not multiples of the 64/128 x 1024 tiles
    (1, 1, 1, 5, 130, 16),
    (1, 1, 131, 1100, 3, 16),  # two key blocks in one segment (online rescale), a 3-row query tail
    (2, 3, 37, 5, None, 40),
    (1, 2, 130, 130, 5, 64),
    (1, 2, 130, 300, 257, 16),
    (2, 1, 65, 1, 1, 40),
]
NAMES = ["dq", "dk1", "dv1", "dk2", "dv2"]


def _id(s):
    return "B{}H{}q{}k{}{}d{}".format(s[0], s[1], s[2], s[3], f"+{s[4]}" if s[4] else "", s[5])


def make(B, H, Nq, N1, N2, D, dtype=torch.float64, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + B * 1000 + Nq * 10 + D)
    mk = lambda n: torch.randn(B, H, n, D, dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa: E731
    q = mk(Nq)
    kv = [(mk(N1), mk(N1))] + ([(mk(N2), mk(N2))] if N2 else [])
    return q, kv


def run_cpp(q, kv, scale):
    k2, v2 = kv[1] if len(kv) > 1 else (None, None)
    return _cpp_mkv.mkv_cpp(q, kv[0][0], kv[0][1], k2, v2, scale)


def loss_grads(out, lse, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, dtype=out.dtype, generator=g)
    dl = torch.randn(lse.shape, dtype=lse.dtype, generator=g)
    return torch.autograd.grad((out * do).sum() + (lse * dl).sum(), inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_fp64_matches_reference(shape, nan_empty):
    q, kv = make(*shape)
    scale = shape[-1] ** -0.5
    inputs = [q] + [t for pair in kv for t in pair]
    out, lse = run_cpp(q, kv, scale)
    rout, rlse = reference.multi_kv_attention(q, kv, scale=scale, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, rout, atol=1e-9, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-9, rtol=0)
    for name, g, rg in zip(NAMES, loss_grads(out, lse, inputs, 1), loss_grads(rout, rlse, inputs, 1)):
        assert g.is_contiguous(), name
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0, msg=lambda m: f"{name}: {m}")


def test_fp32_same_bits_for_any_thread_count():
    """Tasks are taken dynamically, but each writes only its own outputs: 1 and 2 threads agree exactly."""
    q, kv = make(2, 3, 150, 70, 90, 32, dtype=torch.float32)
    inputs = [q] + [t for pair in kv for t in pair]
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = run_cpp(q, kv, 0.2)
            res.append((out, lse, *loss_grads(out, lse, inputs, 3)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_grads_of_out_only_and_of_lse_only():
    q, kv = make(1, 2, 19, 7, 70, 24)
    inputs = [q] + [t for pair in kv for t in pair]
    out, lse = run_cpp(q, kv, 0.3)
    rout, rlse = reference.multi_kv_attention(q, kv, scale=0.3, return_lse=True)
    do = torch.randn_like(out)
    for got, want in ((out, rout), (lse, rlse)):
        grad = do if got is out else torch.randn_like(lse)
        gs = torch.autograd.grad(got, inputs, grad, retain_graph=True)
        # lse does not depend on v: the reference graph has no dv then, the kernel returns zeros
        rgs = torch.autograd.grad(want, inputs, grad, retain_graph=True, allow_unused=True)
        for name, g, rg, t in zip(NAMES, gs, rgs, inputs):
            rg = torch.zeros_like(t) if rg is None else rg
            torch.testing.assert_close(g, rg, atol=1e-9, rtol=0, msg=lambda m: f"{name}: {m}")


def test_strided_inputs():
    """q/k/v as [B, H, N, D] views of [B, N, H, D] storage (a fused projection) and a D-strided k."""
    g = torch.Generator().manual_seed(5)
    B, H, N, D = 2, 3, 41, 16
    qs, k1s, v1s, k2s, v2s = [torch.randn(B, N, H, D, dtype=torch.float64, generator=g) for _ in range(5)]
    q, k1, v1, k2, v2 = [t.transpose(1, 2) for t in (qs, k1s, v1s, k2s, v2s)]
    k2 = torch.randn(B, H, D, N, dtype=torch.float64, generator=g).transpose(2, 3)  # unit stride on N, not D
    out, lse = _cpp_mkv.mkv_cpp(q, k1, v1, k2, v2, 0.25)
    rout, rlse = reference.multi_kv_attention(q, [(k1, v1), (k2, v2)], scale=0.25, return_lse=True)
    torch.testing.assert_close(out, rout, atol=1e-9, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-9, rtol=0)


def test_fp32_strided_inputs_odd_head_dim():
    """fp32 (the 16 x 16 register-tile transposes of the key/value panels, q and dO blocks and
    dK/dV, whose edges take the scalar loop): [B, H, N, D] views of [B, N, H, D] storage with D 40
    and token counts off multiples of 16 give the same bits as contiguous copies, and match the
    fp64 reference."""
    g = torch.Generator().manual_seed(7)
    B, H, Nq, N1, N2, D = 2, 3, 53, 41, 35, 40
    views = [torch.randn(B, n, H, D, generator=g).transpose(1, 2) for n in (Nq, N1, N1, N2, N2)]
    dout = torch.randn(B, H, Nq, D, generator=g)

    def run(ts):
        ts = [t.detach().requires_grad_() for t in ts]
        out, lse = _cpp_mkv.mkv_cpp(*ts, 0.3)
        return [out, lse, *torch.autograd.grad((out * dout).sum(), ts)]

    got = run(views)
    same = run([t.contiguous() for t in views])
    for a, b in zip(got, same):
        assert torch.equal(a, b)
    q, k1, v1, k2, v2 = [t.detach().double().requires_grad_() for t in views]
    rout, rlse = reference.multi_kv_attention(q, [(k1, v1), (k2, v2)], scale=0.3, return_lse=True)
    truth = [rout, rlse, *torch.autograd.grad((rout * dout.double()).sum(), (q, k1, v1, k2, v2))]
    for a, t in zip(got, truth):
        torch.testing.assert_close(a.double(), t, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=_id)
def test_fp32_within_reference_error(shape):
    """fp32 kernel error vs the fp64 truth <= 2x (out, lse) / 3x (grads) the fp32 reference's own."""
    q64, kv64 = make(*shape)
    scale = shape[-1] ** -0.5
    q32, kv32 = (
        [t.detach().float().requires_grad_() for t in [q64]][0],
        [tuple(t.detach().float().requires_grad_() for t in p) for p in kv64],
    )
    in64 = [q64] + [t for p in kv64 for t in p]
    in32 = [q32] + [t for p in kv32 for t in p]
    tout, tlse = reference.multi_kv_attention(q64, kv64, scale=scale, return_lse=True)
    out, lse = run_cpp(q32, kv32, scale)
    rout, rlse = reference.multi_kv_attention(q32, kv32, scale=scale, return_lse=True)
    assert out.dtype == lse.dtype == torch.float32
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    for name, got, ref, truth in (("out", out, rout, tout), ("lse", lse, rlse, tlse)):
        assert err(got, truth) <= 2 * err(ref, truth) + 1e-6, (name, err(got, truth), err(ref, truth))
    gt = loss_grads(tout, tlse, in64, 2)
    gk = loss_grads(out, lse, in32, 2)
    gr = loss_grads(rout, rlse, in32, 2)
    for name, a, b, t in zip(NAMES, gk, gr, gt):
        assert err(a, t) <= 3 * err(b, t) + 1e-6, (name, err(a, t), err(b, t))


def test_gradcheck_fp64():
    q, kv = make(1, 2, 3, 4, 2, 8)
    f = lambda q, k1, v1, k2, v2: _cpp_mkv.mkv_cpp(q, k1, v1, k2, v2, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, *kv[0], *kv[1]))
    q, kv = make(1, 1, 5, 3, None, 8)
    g = lambda q, k1, v1: _cpp_mkv.mkv_cpp(q, k1, v1, None, None, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(g, (q, *kv[0]))


def test_opcheck_forward_and_backward_ops():
    q, kv = make(1, 2, 5, 4, 3, 16, dtype=torch.float32)
    (k1, v1), (k2, v2) = kv
    torch.library.opcheck(torch.ops.dcal.mkv_fwd.default, (q, k1, v1, k2, v2, 0.25))
    torch.library.opcheck(torch.ops.dcal.mkv_fwd.default, (q, k1, v1, None, None, 0.25))
    out, lse = torch.ops.dcal.mkv_fwd(q, k1, v1, k2, v2, 0.25)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    d = [t.detach() for t in (q, k1, v1, k2, v2, out, lse)]
    torch.library.opcheck(torch.ops.dcal.mkv_bwd.default, (do, dl, *d, 0.25))
    torch.library.opcheck(torch.ops.dcal.mkv_bwd.default, (do, None, d[0], d[1], d[2], None, None, d[5], d[6], 0.25))


def test_no_tensor_saved_when_no_grad_needed():
    q, kv = make(1, 1, 4, 3, 3, 16, dtype=torch.float32, requires_grad=False)
    out, _ = run_cpp(q, kv, 0.25)
    assert out.grad_fn is None


def test_kernel_rejects_what_it_cannot_run():
    q, kv = make(1, 1, 4, 3, None, 16, requires_grad=False)
    ((k, v),) = kv
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.dcal.mkv_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, 0.25)
    with pytest.raises(RuntimeError, match="same, nonzero length"):
        torch.ops.dcal.mkv_fwd(q, k, v[:, :, :2], None, None, 0.25)


@pytest.mark.parametrize(
    "dtype,want",
    [(torch.float32, "cpp"), (torch.float64, "cpp"), (torch.bfloat16, "sdpa")],
    ids=["fp32", "fp64", "bf16"],
)
def test_cpu_default_chain(dtype, want, monkeypatch):
    monkeypatch.delenv("DCAL_BACKEND", raising=False)
    q = torch.randn(1, 2, 9, 16, dtype=dtype)
    assert ops.chosen_backend("multi_kv_attention", q) == want


def test_public_op_through_cpp_backend():
    q, kv = make(1, 2, 21, 9, 33, 16)
    out, lse = ops.multi_kv_attention(q, kv, return_lse=True, backend="cpp")
    rout, rlse = reference.multi_kv_attention(q, kv, return_lse=True)
    torch.testing.assert_close(out, rout, atol=1e-9, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-9, rtol=0)
