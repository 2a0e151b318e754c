"""The GPU-proof harness (docs/design.md), packaging and dispatch, on a tiny real Triton kernel."""

import os
import subprocess
import sys

import pytest
import torch

import dcal
from dcal import _ext, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_NO_INTERP = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
@pytest.mark.parametrize("m,n", [(1, 1), (5, 300), (3, 1025)], ids=lambda v: str(v))
def test_probe_kernel_runs_in_interpreter(m, n):
    from dcal.kernels._probe import row_lse

    x = torch.randn(m, n)
    torch.testing.assert_close(row_lse(x, block_n=128), torch.logsumexp(x, dim=1), atol=1e-5, rtol=1e-5)


def test_probe_kernel_compiles_to_sm80_sm90_cubins():
    from dcal.testing.aot import compile_in_subprocess

    rows = compile_in_subprocess(modules=("dcal.kernels._probe",), archs=(80, 90))
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["label"]["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    for r in rows:
        assert r["cubin_bytes"] > 0 and 0 < r["regs"] <= 255, r
        assert r["spill_bytes"] == 0, r


def test_compiler_refuses_a_mixed_dtype_dot(tmp_path):
    """The AOT path really runs the compiler: a dot of fp32 by fp16 operands is refused."""
    code = r"""
import triton, triton.language as tl
from dcal.testing.aot import AOTSpec, compile_spec
@triton.jit
def bad(a, b, c, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(a + r[:, None] * BLOCK + r[None, :])
    y = tl.load(b + r[:, None] * BLOCK + r[None, :])
    tl.store(c + r[:, None] * BLOCK + r[None, :], tl.dot(x, y))
spec = AOTSpec("bad", bad, {"a": "*fp32", "b": "*fp16", "c": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 32})
try:
    compile_spec(spec, 80)
except Exception as e:
    print("REFUSED", type(e).__name__)
else:
    print("ACCEPTED")
"""
    script = tmp_path / "bad_kernel.py"  # triton wants @jit functions in a file
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], env=ENV_NO_INTERP, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr


def test_kernel_report_prints_table():
    out = subprocess.run(
        [sys.executable, "-m", "bench.kernel_report", "--filter", "probe", "--no-cuda-cpp", "--csv", ""],
        cwd=ROOT,
        env=ENV_NO_INTERP,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("probe_row_lse")]
    assert len(lines) == 12  # 3 dtypes x 2 block sizes x 2 archs
    assert "regs" in out.stdout and "spill" in out.stdout and "0 with spills" in out.stdout


def test_kernels_folder_is_installed_as_dcal_kernels_only():
    code = "import importlib.util, dcal.kernels; print(importlib.util.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_extension_is_built_and_registers_ops():
    assert _ext.HAS_EXTENSION, _ext.EXTENSION_ERROR
    assert hasattr(torch.ops, "dcal")


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
def test_extension_has_cuda_kernels_when_torch_is_cuda_build():
    if os.environ.get("DCAL_NO_CUDA") == "1":
        pytest.skip("built with DCAL_NO_CUDA=1")
    assert _ext.built_with_cuda(), "torch is a CUDA build but dcal._C was built without its CUDA kernels"


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXTENSION", False)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _ext.require()


def test_explain_lists_each_backend_with_reason():
    q = torch.randn(1, 2, 5, 16)
    text = ops.explain("pwca_attention", q)
    assert "sdpa" in text and "chosen" in text and "skipped" in text
    assert "reference" in text
    text64 = ops.explain("multi_kv_attention", q.double(), backend="triton")
    assert "triton" in text64 and "skipped" in text64


def test_explicit_backend_that_cannot_run_raises_with_reason():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot run .*float64|backend='triton' cannot run"):
        ops.multi_kv_attention(q, [(q, q)], backend="triton")


def test_dcal_backend_env_moves_backend_to_front(monkeypatch):
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    monkeypatch.setenv("DCAL_BACKEND", "reference")
    assert ops.chosen_backend("multi_kv_attention", q) == "reference"
    monkeypatch.setenv("DCAL_BACKEND", "sdpa")  # sdpa has no neighborhood op: falls through the chain
    assert ops.chosen_backend("neighborhood_attention2d", torch.randn(1, 1, 4, 4, 8)) != "sdpa"
    monkeypatch.setenv("DCAL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DCAL_BACKEND"):
        ops.multi_kv_attention(q, [(q, q)])


def test_version():
    assert dcal.__version__
