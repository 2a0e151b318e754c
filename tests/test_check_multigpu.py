"""The cuda:1 case of ``python -m dcal.check``: skipped with its reason on a machine with fewer
than two GPUs (run for real where there are two), in the worker-row format the report reads."""

import json
import subprocess
import sys

import pytest
import torch

from dcal.check import multigpu

ROW_FIELDS = (
    "op",
    "backend",
    "device",
    "dtype",
    "shape",
    "check",
    "status",
    "max_err",
    "tol",
    "seconds",
    "detail",
    "id",
)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="two GPUs: runs for real")
def test_cuda1_case_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "rows.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "dcal.check.multigpu", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["op"] for r in rows] == list(multigpu.CASES)
    for r in rows:
        assert set(ROW_FIELDS) <= set(r)
        assert r["status"] == "skip" and r["device"] == "cuda:1" and "second GPU" in r["detail"], r


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs two GPUs")
def test_cuda1_case_passes_on_two_gpus():  # pragma: no cover - needs two GPUs
    rows = multigpu.rows()
    assert all(r["status"] == "pass" for r in rows), rows


@pytest.mark.parametrize("op", multigpu.CASES)
def test_cuda1_case_logic_under_the_interpreter(op, monkeypatch):
    """The case's comparison (forward, gradients, tolerance) on CPU tensors under TRITON_INTERPRET=1;
    a wrong Triton result is reported as a failure."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    torch.set_num_threads(1)
    r = multigpu.run_case(op, device="cpu")
    assert r["status"] == "pass" and r["max_err"] < 1e-4, r
    from dcal import ops

    real = getattr(ops, op)

    def broken(*a, backend=None, **kw):
        out = real(*a, backend=backend, **kw)
        return out * 1.1 if backend == "triton" else out

    monkeypatch.setattr(ops, op, broken)
    assert multigpu.run_case(op, device="cpu")["status"] == "fail"


def test_driver_part_reads_the_rows_of_its_subprocess(tmp_path):
    from dcal.check.cli import child_env

    import time

    rows = multigpu.run_from_driver(None, child_env("cuda"), str(tmp_path), time.time() + 300)
    assert [r["op"] for r in rows] == list(multigpu.CASES)
    want = "pass" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "skip"
    assert all(r["status"] == want for r in rows), rows
