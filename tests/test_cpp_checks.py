"""Direct calls of the C++ entry points (torch.ops.dcal.*, past the public ops' checks) with bad
arguments: every check runs before any input is copied or output allocated, and its message
starts with the op's name and names the argument (csrc/checks.h). The Python class is each op's:
RuntimeError for mkv_* and na2d_*, ValueError / TypeError for rollout and cpu_peak."""

import pytest
import torch

from dcal import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C not built")


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_mkv_checks_run_before_the_segments_are_copied():
    # A 3-D key that is not BLAS-ready: it used to be copied (and indexed as 4-D) before the checks.
    q = t(1, 2, 4, 16)
    k_bad = t(2, 16, 5).transpose(-1, -2)
    with pytest.raises(RuntimeError, match=r"^mkv_fwd: k1 must be \[B, H, Nk, D\] matching q"):
        torch.ops.dcal.mkv_fwd(q, k_bad, t(1, 2, 5, 16), None, None, 0.25)
    v = t(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=r"^mkv_fwd: v2 must be \[B, H, Nk, D\] matching q"):
        torch.ops.dcal.mkv_fwd(q, v, v, v, k_bad, 0.25)


def test_mkv_fwd_names_the_argument():
    q, k, v = t(1, 2, 4, 16), t(1, 2, 5, 16), t(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="^mkv_fwd: k2 and v2 must be given together"):
        torch.ops.dcal.mkv_fwd(q, k, v, k, None, 0.25)
    with pytest.raises(RuntimeError, match=r"^mkv_fwd: v1 has dtype Double; k/v must have q's dtype \(Float\)"):
        torch.ops.dcal.mkv_fwd(q, k, v.double(), None, None, 0.25)
    with pytest.raises(RuntimeError, match="^mkv_fwd: k2 and v2 need the same, nonzero length, got 5 and 3"):
        torch.ops.dcal.mkv_fwd(q, k, v, k, v[:, :, :3], 0.25)
    with pytest.raises(RuntimeError, match="^mkv_fwd: q needs at least one token"):
        torch.ops.dcal.mkv_fwd(q[:, :, :0], k, v, None, None, 0.25)
    with pytest.raises(RuntimeError, match="^mkv_fwd: q must be float32 or float64, got Half"):
        torch.ops.dcal.mkv_fwd(q.half(), k.half(), v.half(), None, None, 0.25)
    # RuntimeError, not a subclass that a caller would have to catch differently
    try:
        torch.ops.dcal.mkv_fwd(q, k, v, k, None, 0.25)
    except RuntimeError as e:
        assert not isinstance(e, (ValueError, TypeError))


def test_mkv_bwd_checks_the_saved_tensors():
    q, k, v = t(1, 2, 4, 16), t(1, 2, 5, 16), t(1, 2, 5, 16)
    out, lse = torch.ops.dcal.mkv_fwd(q, k, v, None, None, 0.25)
    do = torch.randn_like(out)
    grads = torch.ops.dcal.mkv_bwd(do, torch.randn_like(lse), q, k, v, None, None, out, lse, 0.25)
    assert [tuple(g.shape) for g in grads] == [(1, 2, 4, 16), (1, 2, 5, 16), (1, 2, 5, 16)]
    # a dlse of the wrong shape would be read past its end by the kernel
    with pytest.raises(RuntimeError, match=r"^mkv_bwd: dlse must be \[B, H, Nq\] = \[1, 2, 4\], got \[1, 2, 3\]"):
        torch.ops.dcal.mkv_bwd(do, lse[:, :, :3], q, k, v, None, None, out, lse, 0.25)
    with pytest.raises(RuntimeError, match=r"^mkv_bwd: dout must be \[B, H, Nq, D\]"):
        torch.ops.dcal.mkv_bwd(do[:, :, :3], None, q, k, v, None, None, out, lse, 0.25)
    with pytest.raises(RuntimeError, match=r"^mkv_bwd: lse must be \[B, H, Nq\]"):
        torch.ops.dcal.mkv_bwd(do, None, q, k, v, None, None, out, lse[0], 0.25)
    with pytest.raises(RuntimeError, match="^mkv_bwd: out must be floating, got Long"):
        torch.ops.dcal.mkv_bwd(do, None, q, k, v, None, None, out.long(), lse, 0.25)
    with pytest.raises(RuntimeError, match="^mkv_bwd: k2 and v2 must be given together"):
        torch.ops.dcal.mkv_bwd(do, None, q, k, v, None, v, out, lse, 0.25)


def test_rollout_checks_raise_python_classes_with_the_op_name():
    q = t(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"^rollout: qs\[0\] must be \[B, H, N, D\], got shape \[2, 5, 16\]"):
        torch.ops.dcal.rollout([q[0]], [q[0]], [], 0.25, 0.5)
    with pytest.raises(TypeError, match=r"^rollout: ks\[1\] has dtype Double but qs\[0\] has Float"):
        torch.ops.dcal.rollout([q, q], [q, q.double()], [], 0.25, 0.5)
    with pytest.raises(TypeError, match=r"^rollout: lses\[0\] must be floating, got Long"):
        torch.ops.dcal.rollout([q], [q], [q[..., 0].long()], 0.25, 0.5)
    with pytest.raises(ValueError, match=r"^rollout: qs\[0\] has no heads"):
        torch.ops.dcal.rollout([q[:, :0]], [q[:, :0]], [], 0.25, 0.5)
    # empty batch: the defined empty result, no check trips on the missing heads
    r = torch.ops.dcal.rollout([q[:0, :0]], [q[:0, :0]], [], 0.25, 0.5)
    assert r.shape == (0, 5) and r.dtype == torch.float32


def test_cpu_peak_checks():
    with pytest.raises(ValueError, match="^cpu_peak: kind must be 'brgemm', 'sgemm' or 'fma', got 'x'"):
        _ext._C.cpu_peak("x", 8, 8, 8, 0.01)
    with pytest.raises(ValueError, match="^cpu_peak: seconds must be positive"):
        _ext._C.cpu_peak("fma", 1, 1, 1, 0.0)
    with pytest.raises(ValueError, match="^cpu_peak: M, N, K must be >= 1, got 0, 8, 8"):
        _ext._C.cpu_peak("sgemm", 0, 8, 8, 0.01)
    assert _ext._C.cpu_peak("fma", 0, 0, 0, 0.001) >= 0.0  # fma ignores M, N, K
