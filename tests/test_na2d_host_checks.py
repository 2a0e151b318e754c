"""Direct calls of the na2d C++ entry points (torch.ops.dcal.na2d_fwd / na2d_bwd, past the public
op's checks) with bad arguments: the shared host checks (csrc/na2d_host.cpp) and the CPU ones
raise RuntimeError before any kernel runs, the message starting with the op's name and naming
the argument."""

import pytest
import torch

from dcal import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C not built")


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def fwd(q, k=None, v=None, rpb=None, ks=3, border=0, dil=1):
    k = q if k is None else k
    v = q if v is None else v
    return torch.ops.dcal.na2d_fwd(q, k, v, rpb, ks, border, 1.0, dil)


Q = (1, 2, 6, 7, 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fwd(t(2, 6, 7, 8)), r"^na2d: q must have 5 dimensions \[B, H, X, Y, D\], got shape \[2, 6, 7, 8\]"),
        (lambda: fwd(t(*Q), k=t(1, 2, 6, 7, 4)), r"^na2d: k has shape \[1, 2, 6, 7, 4\]; expected the shape of q"),
        (lambda: fwd(t(*Q), v=t(1, 2, 6, 6, 8)), r"^na2d: v has shape \[1, 2, 6, 6, 8\]; expected the shape of q"),
        (lambda: fwd(t(*Q), v=t(*Q, dtype=torch.float64)), r"^na2d: k \(Float\) and v \(Double\) must have the dtype"),
        (lambda: fwd(t(*Q), ks=4), r"^na2d: kernel_size must be an odd int >= 3 \(and < 32768\), got 4"),
        (lambda: fwd(t(*Q), border=3), r"^na2d: border must be 0 \(zero\), 1 \(mask\) or 2 \(clamp\), got 3"),
        (lambda: fwd(t(*Q), dil=0), r"^na2d: dilation must be an int >= 1 \(and < 32768\), got 0"),
        (lambda: fwd(t(*Q), border=2, ks=3, dil=3), r"^na2d: border clamp needs a map of at least .* got 6x7"),
        (lambda: fwd(t(1, 2, 6, 7, 0)), r"^na2d: q must have a non-empty map and head dim"),
        (lambda: fwd(t(*Q), rpb=t(2, 5, 4)), r"^na2d: rpb must have shape \[H, 2\*kernel_size-1, 2\*kernel_size-1\]"),
        (lambda: fwd(t(*Q), rpb=t(2, 5, 5, dtype=torch.float64)), r"^na2d: rpb has dtype Double; expected the dtype"),
        (lambda: fwd(t(*Q, dtype=torch.float16)), r"^na2d_fwd: q has dtype Half; the CPU kernels take float32"),
    ],
)
def test_fwd_refusals(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_bwd_refusals():
    q = t(*Q)
    out, lse = fwd(q)

    def bwd(dout=out, out_=out, lse_=lse, q_=q):
        return torch.ops.dcal.na2d_bwd(dout, q_, q_, q_, None, out_, lse_, 3, 0, 1.0, 1)

    with pytest.raises(RuntimeError, match=r"^na2d_bwd: dout has shape \[1, 2, 6, 7, 4\]; expected the shape of q"):
        bwd(dout=t(1, 2, 6, 7, 4))
    with pytest.raises(RuntimeError, match=r"^na2d_bwd: out has shape"):
        bwd(out_=t(1, 2, 6, 6, 8))
    with pytest.raises(RuntimeError, match=r"^na2d_bwd: dout \(Double\) and out \(Float\) must have the dtype of q"):
        bwd(dout=out.double())
    with pytest.raises(RuntimeError, match=r"^na2d_bwd: lse has shape \[1, 2, 6\]; expected \[B, H, X, Y\]"):
        bwd(lse_=lse[..., 0])
    with pytest.raises(RuntimeError, match=r"^na2d_bwd: lse has dtype Double; expected Float"):
        bwd(lse_=lse.double())
    with pytest.raises(RuntimeError, match=r"^na2d: k has shape"):  # the shared checks run first
        torch.ops.dcal.na2d_bwd(out, q, t(1, 2, 6, 7, 4), q, None, out, lse, 3, 0, 1.0, 1)
    dq, dk, dv, drpb = bwd()  # and the good call still runs
    assert dq.shape == q.shape and drpb.numel() == 0
