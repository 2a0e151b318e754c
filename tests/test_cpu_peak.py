"""The peak the CPU bench divides by (bench.measure.matmul_gflops, dcal._C.cpu_peak) and the CPU
kernels' sign handling of the scale folded into the exponent."""

import pytest
import torch

from dcal import _ext, ops
from dcal.ops import reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C not built")


def test_cpu_peak_kinds(one_thread):
    for kind in ("brgemm", "sgemm"):
        g = _ext._C.cpu_peak(kind, 24, 40, 16, 0.01)
        assert 0.01 < g < 1e5, (kind, g)
    lanes = _ext._C.cpu_fma_lanes()
    assert lanes in (0, 8, 16)
    f = _ext._C.cpu_peak("fma", 1, 1, 1, 0.01)
    assert (f == 0.0) if lanes == 0 else (0.01 < f < 1e5)


@pytest.mark.parametrize(
    "args, match",
    [
        (("gemm", 2, 2, 2, 0.01), "kind must be"),
        (("brgemm", 0, 2, 2, 0.01), "M, N, K must be >= 1"),
        (("sgemm", 2, 2, 2, 0.0), "seconds must be positive"),
    ],
)
def test_cpu_peak_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        _ext._C.cpu_peak(*args)


def test_matmul_peak_is_the_best_named_gemm(one_thread):
    from bench.measure import matmul_gflops, peak_description

    p = matmul_gflops("cpu", "float32", n=128, reps=3)
    cands = p["candidates"]
    assert any(k.startswith("MKL sgemm") for k in cands)
    assert any(k.startswith("oneDNN brgemm") for k in cands)
    assert p["source"] in cands and p["gflops"] == max(cands.values())
    text = peak_description(p)
    assert p["source"] in text and f"{p['gflops']:.1f}" in text
    if p["fma_gflops"]:
        assert "FMA peak" in text


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_mkv_scale_not_positive_fp64(scale):
    """The row maximum of scale * s is scale * min s for a negative scale: with logits spread over
    thousands, an offset taken from the wrong end would clamp the exponentials."""
    g = torch.Generator().manual_seed(5)
    mk = lambda n: (20 * torch.randn(2, 2, n, 24, dtype=torch.float64, generator=g)).requires_grad_()  # noqa: E731
    q, k1, v1, k2, v2 = mk(19), mk(33), mk(33), mk(7), mk(7)
    out = ops.pwca_attention(q, k1, v1, k2, v2, scale=scale, backend="cpp")
    ref = reference.multi_kv_attention(q, [(k1, v1), (k2, v2)], scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)
    do = torch.randn(out.shape, dtype=out.dtype, generator=g)
    for a, b in zip(
        torch.autograd.grad(out, (q, k1, v1, k2, v2), do), torch.autograd.grad(ref, (q, k1, v1, k2, v2), do)
    ):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("with_lse", [False, True])
def test_rollout_negative_scale_fp64(with_lse):
    g = torch.Generator().manual_seed(6)
    qs = [20 * torch.randn(2, 3, 29, 16, dtype=torch.float64, generator=g) for _ in range(3)]
    ks = [20 * torch.randn(2, 3, 29, 16, dtype=torch.float64, generator=g) for _ in range(3)]
    lses = [torch.logsumexp(-0.4 * q @ k.transpose(-2, -1), -1) for q, k in zip(qs, ks)] if with_lse else None
    got = ops.attention_rollout(qs, ks, scale=-0.4, lses=lses, backend="cpp")
    ref = reference.attention_rollout(qs, ks, scale=-0.4)
    torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-9, rtol=0)
