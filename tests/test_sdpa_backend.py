"""The "sdpa" backend (exact merge of per-segment fused SDPA through logsumexps) and the custom-op
pattern it sets: opcheck, fake/meta shapes (torch.compile fullgraph: tests/test_compile.py)."""

import pytest
import torch

from dcal import ops
from dcal.ops import _sdpa, reference
from dcal.testing import TIGHT_FLOORS, assert_close_to_reference

SHAPES = [  # (B, H, Nq, Nk1, Nk2 or None, D)
    (1, 1, 1, 5, 130, 16),
    (2, 3, 37, 5, None, 40),
    (1, 2, 130, 130, 5, 64),
    (2, 2, 17, 33, 9, 24),
]


def make(B, H, Nq, N1, N2, D, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(B * 1000 + Nq * 10 + D)
    mk = lambda n: torch.randn(B, H, n, D, dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa: E731
    q = mk(Nq)
    kv = [(mk(N1), mk(N1))] + ([(mk(N2), mk(N2))] if N2 else [])
    return q, kv


def _grads(out, lse, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, dtype=out.dtype, generator=g)
    dl = torch.randn(lse.shape, dtype=lse.dtype, generator=g)
    return torch.autograd.grad((out * do).sum() + (lse * dl).sum(), inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s if v))
def test_sdpa_matches_reference_fp64(shape):
    q, kv = make(*shape)
    inputs = [q] + [t for pair in kv for t in pair]
    out, lse = ops.multi_kv_attention(q, kv, return_lse=True, backend="sdpa")
    rout, rlse = reference.multi_kv_attention(q, kv, return_lse=True)
    torch.testing.assert_close(out, rout, atol=1e-9, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-9, rtol=0)
    for name, g, rg in zip(
        ["dq", "dk1", "dv1", "dk2", "dv2"], _grads(out, lse, inputs, 1), _grads(rout, rlse, inputs, 1)
    ):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0, msg=lambda m: f"{name}: {m}")


def test_sdpa_grads_without_lse_use_fast_path():
    q, kv = make(1, 2, 9, 7, 5, 16)
    out = ops.multi_kv_attention(q, kv, backend="sdpa")
    rout = reference.multi_kv_attention(q, kv)
    inputs = [q] + [t for pair in kv for t in pair]
    do = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, inputs, do), torch.autograd.grad(rout, inputs, do)):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0)


def test_more_than_two_segments_merge_exactly():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 16, dtype=torch.float64, generator=g, requires_grad=True)
    kv = [
        (
            torch.randn(1, 2, n, 16, dtype=torch.float64, generator=g, requires_grad=True),
            torch.randn(1, 2, n, 16, dtype=torch.float64, generator=g, requires_grad=True),
        )
        for n in (3, 4, 5)
    ]
    out, lse = ops.multi_kv_attention(q, kv, return_lse=True, backend="sdpa")
    rout, rlse = reference.multi_kv_attention(q, kv, return_lse=True)
    torch.testing.assert_close(out, rout, atol=1e-9, rtol=0)
    inputs = [q] + [t for p in kv for t in p]
    for g1, g2 in zip(_grads(out, lse, inputs, 4), _grads(rout, rlse, inputs, 4)):
        torch.testing.assert_close(g1, g2, atol=1e-9, rtol=0)


def test_sdpa_gradcheck_fp64():
    q, kv = make(1, 2, 3, 4, 2, 8)
    f = lambda q, k1, v1, k2, v2: ops.pwca_attention(q, k1, v1, k2, v2, return_lse=True, backend="sdpa")  # noqa
    assert torch.autograd.gradcheck(f, (q, *kv[0], *kv[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_low_precision_within_reference_error(dtype):
    q, kv = make(1, 2, 33, 17, 20, 32, dtype=torch.float32, requires_grad=False)
    truth = reference.multi_kv_attention(q.double(), [(k.double(), v.double()) for k, v in kv])
    got = ops.multi_kv_attention(q.to(dtype), [(k.to(dtype), v.to(dtype)) for k, v in kv], backend="sdpa")
    ref_lp = reference.multi_kv_attention(q.to(dtype), [(k.to(dtype), v.to(dtype)) for k, v in kv])
    assert_close_to_reference("out", got, truth, ref_lp, floors=TIGHT_FLOORS)


def test_opcheck_forward_and_backward_ops():
    q, kv = make(1, 2, 5, 4, 3, 16, dtype=torch.float32)
    (k1, v1), (k2, v2) = kv
    torch.library.opcheck(_sdpa.mkv_sdpa_fwd, (q, k1, v1, k2, v2, 0.25))
    torch.library.opcheck(_sdpa.mkv_sdpa_fwd, (q, k1, v1, None, None, 0.25))
    out, lse = _sdpa.mkv_sdpa_fwd(q, k1, v1, k2, v2, 0.25)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    args = (do, dl, q.detach(), k1.detach(), v1.detach(), k2.detach(), v2.detach(), out.detach(), lse.detach(), 0.25)
    torch.library.opcheck(_sdpa.mkv_sdpa_bwd, args)


def test_meta_device_shapes():
    q = torch.empty(2, 12, 785, 64, device="meta")
    k = torch.empty(2, 12, 785, 64, device="meta")
    out, lse = ops.pwca_attention(q, k, k, k, k, return_lse=True, backend="sdpa")
    assert out.shape == q.shape and out.device.type == "meta" and out.dtype == q.dtype
    assert lse.shape == (2, 12, 785) and lse.dtype == torch.float32


def test_no_tensor_saved_when_no_grad_needed():
    q, kv = make(1, 1, 4, 3, 3, 16, dtype=torch.float32, requires_grad=False)
    (k1, v1), (k2, v2) = kv
    out, _ = _sdpa.mkv_sdpa_fwd(q, k1, v1, k2, v2, 0.25)
    assert out.grad_fn is None
