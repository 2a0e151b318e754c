"""Second derivatives: every fused backward is first-order only and must refuse a second
differentiation with one clear error naming the op and the backend that supports it, never return
silent zeros (issue: the C++ backward once returned zeros). The reference backend differentiates
twice exactly (fp64 gradgradcheck)."""

from __future__ import annotations

import pytest
import torch

import dcal.ops as ops
from dcal import _ext

DT = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=DT, generator=g)


def _mkv(backend, dtype=DT):
    q, k1, v1, k2, v2 = (_rand(1, 2, n, 16, seed=i).to(dtype).requires_grad_() for i, n in enumerate((5, 5, 5, 3, 3)))
    out = ops.pwca_attention(q, k1, v1, k2, v2, backend=backend)
    return out, (q, k1, v1, k2, v2)


def _na2d(backend, dtype=DT):
    q, k, v = (_rand(1, 2, 6, 5, 16, seed=i).to(dtype).requires_grad_() for i in range(3))
    rpb = _rand(2, 5, 5, seed=9).to(dtype).requires_grad_()
    out = ops.neighborhood_attention2d(q, k, v, kernel_size=3, rpb=rpb, backend=backend)
    return out, (q, k, v, rpb)


def _fused_cases():
    cases = []
    if _ext.HAS_EXTENSION:
        cases += [("multi_kv_attention", "cpp", _mkv, DT), ("neighborhood_attention2d", "cpp", _na2d, DT)]
    cases.append(("multi_kv_attention", "sdpa", _mkv, DT))
    if not torch.cuda.is_available():  # Triton on CPU tensors runs in the interpreter (tests/conftest.py)
        cases += [
            ("multi_kv_attention", "triton", _mkv, torch.float32),
            ("neighborhood_attention2d", "triton", _na2d, torch.float32),
        ]
    return cases


@pytest.mark.parametrize("op,backend,make,dtype", _fused_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_second_backward_raises_naming_op(op, backend, make, dtype):
    out, inputs = make(backend, dtype)
    ref_out, ref_inputs = make("reference", dtype)
    # first order with create_graph=True is still exact
    g = torch.autograd.grad((out**2).sum(), inputs[0], create_graph=True)[0]
    g_ref = torch.autograd.grad((ref_out**2).sum(), ref_inputs[0], create_graph=True)[0]
    tol = 1e-9 if dtype == DT else 1e-4
    torch.testing.assert_close(g.detach(), g_ref.detach(), atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match=rf"{op} \(backend '{backend}'\).*first-order.*backend='reference'"):
        torch.autograd.grad((g**2).sum(), inputs[1])


@pytest.mark.parametrize("op,backend,make,dtype", _fused_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_second_backward_raises_with_constant_grad_output(op, backend, make, dtype):
    # grad of out.sum(): the incoming gradient needs no grad, the saved inputs do
    out, inputs = make(backend, dtype)
    g = torch.autograd.grad(out.sum(), inputs[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(g.pow(2).sum(), inputs[1])


def test_reference_double_backward_is_exact():
    q, k1, v1 = (_rand(1, 1, 4, 8, seed=i).requires_grad_() for i in range(3))
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: ops.multi_kv_attention(q, [(k, v)], backend="reference"), (q, k1, v1)
    )
    q, k, v = (_rand(1, 1, 4, 3, 4, seed=i).requires_grad_() for i in range(3))
    rpb = _rand(1, 5, 5, seed=5).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda q, k, v, r: ops.neighborhood_attention2d(q, k, v, kernel_size=3, rpb=r, backend="reference"),
        (q, k, v, rpb),
    )


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
def test_plain_first_order_is_unchanged():
    out, inputs = _na2d("cpp")
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(g is not None and not g.requires_grad for g in grads)
