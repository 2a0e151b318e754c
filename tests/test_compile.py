"""torch.compile(fullgraph=True) through every multi-key/value backend that registers its kernels
as custom ops: one graph, no break, forward and backward equal to eager."""

import pytest
import torch

from dcal import _ext, ops


def _cpp(q, k1, v1, k2, v2):
    from dcal.ops import _cpp_mkv

    return _cpp_mkv.mkv_cpp(q, k1, v1, k2, v2, 0.25)


def _sdpa(q, k1, v1, k2, v2):
    return ops.pwca_attention(q, k1, v1, k2, v2, return_lse=True, backend="sdpa")


BACKENDS = [
    pytest.param(_cpp, id="cpp", marks=pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C not built")),
    pytest.param(_sdpa, id="sdpa"),
]


@pytest.mark.parametrize("attend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(attend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for n in (7, 5, 5, 6, 6))
    inputs = [q, k1, v1, k2, v2]

    def f(*args):
        out, lse = attend(*args)
        return out.sum() + lse.sum()

    with torch._dynamo.config.patch(recompile_limit=2):
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = cf(*inputs)
        gg = torch.autograd.grad(got, inputs)
    want = f(*inputs)
    wg = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b)
