"""Smoke tests of the benchmark machinery (bench/common.py) and of ``bench.pwca --quick``.

The runner forks a fresh process per measurement, so these tests check what crosses the process
boundary: times, peak memory, OOM/error/skip statuses, the CSV, the plot and the command line.
"""
import csv
import os
import sys
import textwrap

import pytest
import torch

import bench.common as common

# A bench module written to a temporary directory: providers with known time and memory, and
# each way a provider can fail.
TOY = textwrap.dedent('''
    import os, signal, time
    import torch
    from bench.common import Case, Unavailable

    NAME = "toy"
    BASELINE = "sleep"

    def cases(quick, device):
        return [Case("n32", dict(n=32), device=device, flops=2e6, x=32, group="fwd")]

    def make_inputs(case):
        return torch.ones(case.params["n"])

    def sleep(case, x):
        return lambda: time.sleep(0.02)

    def alloc32(case, x):
        # 32 MiB live at once, touched so the pages are resident
        return lambda: torch.ones(8 * 1024 * 1024, dtype=torch.float32).sum()

    def oom(case, x):
        def f():
            raise torch.OutOfMemoryError("fake: tried to allocate 1 TiB")
        return f

    def over_cap(case, x):
        return lambda: torch.ones(512 * 1024 * 1024, dtype=torch.uint8).sum()  # 512 MiB > cap

    def killed(case, x):
        return lambda: os.kill(os.getpid(), signal.SIGKILL)

    def fails(case, x):
        return lambda: 1 / 0

    def missing(case, x):
        raise Unavailable("not installed here")

    PROVIDERS = dict(sleep=sleep, alloc32=alloc32, oom=oom, over_cap=over_cap, killed=killed,
                     fails=fails, missing=missing)
''')


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "dcal_toy_bench.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("dcal_toy_bench")
    yield mod
    sys.modules.pop("dcal_toy_bench", None)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_runner_measures_and_reports_every_outcome(toy_module, tmp_path, capsys):
    out = tmp_path / "results"
    results = common.bench_main(toy_module, ["--quick", "--reps", "3", "--warmup", "1", "--max-mem", "256M",
                                             "--threads", "1", "--out", str(out)])
    by = {r.provider: r for r in results}
    assert [r.provider for r in results] == list(toy_module.PROVIDERS)

    assert by["sleep"].status == "ok"
    assert by["sleep"].median_ms >= 20.0 and by["sleep"].min_ms <= by["sleep"].median_ms <= by["sleep"].max_ms
    assert by["sleep"].tflops == pytest.approx(2e6 / (by["sleep"].median_ms * 1e-3) / 1e12)
    # 32 MiB of live data beyond the inputs, measured in its own process.
    assert by["alloc32"].status == "ok"
    assert 30 * common.MIB <= by["alloc32"].peak_bytes <= 40 * common.MIB
    assert by["sleep"].peak_bytes < 8 * common.MIB

    assert by["oom"].status == "OOM"
    assert by["over_cap"].status == "OOM"
    assert by["killed"].status == "OOM"
    assert by["fails"].status.startswith("error: ZeroDivisionError")
    assert by["missing"].status == "skipped: not installed here"

    rows = _rows(out / "toy-quick.csv")
    assert [r["provider"] for r in rows] == list(toy_module.PROVIDERS)
    assert set(rows[0]) == set(common.CSV_FIELDS)
    r = rows[1]
    assert (r["bench"], r["case"], r["dtype"], r["shape"], r["device"], r["threads"]) == \
        ("toy", "n32", "float32", "n=32", "cpu", "1")
    assert r["torch"] == torch.__version__ and r["commit"] and r["device_name"]
    assert 30 <= float(r["peak_mib"]) <= 40
    assert rows[0]["time_vs_base"] == "1.0000"
    # The baseline ('sleep') allocates nothing: its peak may measure exactly 0 bytes, and a ratio
    # to 0 is left empty rather than reported as infinity.
    assert rows[0]["mem_vs_base"] == ("1.0000" if by["sleep"].peak_bytes else "")
    assert rows[2]["status"] == "OOM" and rows[2]["median_ms"] == ""
    assert (out / "toy-quick.png").stat().st_size > 1000

    table = capsys.readouterr().out
    assert "== toy ==" in table and "skipped: not installed here" in table


def test_parse_mem_and_flops():
    assert common.parse_mem("8G") == 8 * 1024 ** 3
    assert common.parse_mem("512M") == 512 * common.MIB
    assert common.parse_mem("100") == 100 * common.MIB
    with pytest.raises(ValueError, match="--max-mem"):
        common.parse_mem("lots")
    # Two matmuls of 2*Nq*Nk*D each per (batch, head) forward; the backward adds 2.5x that.
    assert common.flops_attention(2, 12, 785, 1570, 64) == 4 * 2 * 12 * 785 * 1570 * 64
    assert common.flops_attention(1, 1, 10, 20, 8, "fwd+bwd") == 3.5 * 4 * 10 * 20 * 8


def test_time_ratio_pairs_rounds():
    case = common.Case("c", {})
    # Round 2 is slow for both (machine load); the ratio of medians would be 6.5 / 10.
    base = common.Result(case, "b", median_ms=10.0, times_ms=[10.0, 100.0, 10.0, 10.0])
    fast = common.Result(case, "f", median_ms=6.5, times_ms=[5.0, 50.0, 5.0, 8.0])
    assert common.time_ratio(fast, base) == pytest.approx(0.5)
    assert common.time_ratio(common.Result(case, "g", median_ms=20.0), base) == pytest.approx(2.0)


def test_main_skips_missing_bench(monkeypatch, capsys):
    import bench.__main__ as main

    monkeypatch.setattr(main, "BENCHES", ("does_not_exist",))
    assert main.main(["--quick", "does_not_exist"]) == 1
    out = capsys.readouterr().out
    assert "[does_not_exist] skipped: bench/does_not_exist.py does not exist" in out
    with pytest.raises(SystemExit):
        main.main(["--quick", "no_such_name"])


# ----------------------------------------------------------------------------- bench.pwca

import bench.pwca as pwca  # noqa: E402

FAST_PROVIDERS = ["naive", "sdpa_cat", "sdpa_merge", "dcal"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", FAST_PROVIDERS)
def test_pwca_providers_compute_the_same_attention(provider, mode):
    case = next(c for c in pwca.cases(True, "cpu") if c.mode == mode)
    inputs = pwca.make_inputs(case)
    q, k1, v1, k2, v2, dout = inputs
    got = pwca.PROVIDERS[provider](case, inputs)()
    if mode == "fwd":
        want = pwca.naive_pwca(q.double(), k1.double(), v1.double(), k2.double(), v2.double())
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    else:
        x64 = [t.detach().double().requires_grad_() for t in (q, k1, v1, k2, v2)]
        want = torch.autograd.grad(pwca.naive_pwca(*x64), x64, dout.double())
        for name, g, w in zip(("dq", "dk1", "dv1", "dk2", "dv2"), got, want):
            torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_pwca_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    results = common.bench_main(pwca, ["--quick", "--cases", "N33", "--providers", *FAST_PROVIDERS, "--reps", "2",
                                       "--warmup", "1", "--threads", "1", "--out", str(out), "--no-plot"])
    assert len(results) == 2 * len(FAST_PROVIDERS)
    for r in results:
        assert r.status == "ok", (r.case.name, r.provider, r.status)
        assert r.median_ms > 0 and r.peak_bytes is not None and r.tflops > 0
    rows = _rows(out / "pwca-quick.csv")
    assert {(r["case"], r["provider"]) for r in rows} == \
        {(c, p) for c in ("N33-fwd", "N33-fwd+bwd") for p in FAST_PROVIDERS}
    assert all(float(r["flops"]) > 0 for r in rows)
