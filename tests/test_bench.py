"""Smoke tests of the benchmark machinery (bench.common and the modules it re-exports), of
``bench.pwca --quick``, of the time budget, of ``bench.report`` and of the FlexAttention peers.

The runner forks a fresh process per measurement, so these tests check what crosses the process
boundary: times, peak memory, OOM/error/skip statuses, the CSV, the plot and the command line.
"""

import csv
import json
import os
import sys
import textwrap
import time

import pytest
import torch

import bench.common as common

# A bench module written to a temporary directory: providers with known time and memory, and
# each way a provider can fail.
TOY = textwrap.dedent("""
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
""")


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
    results = common.bench_main(
        toy_module,
        [
            "--quick",
            "--reps",
            "3",
            "--warmup",
            "1",
            "--max-mem",
            "256M",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-peak",
        ],
    )
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
    assert (r["bench"], r["case"], r["dtype"], r["shape"], r["device"], r["threads"]) == (
        "toy",
        "n32",
        "float32",
        "n=32",
        "cpu",
        "1",
    )
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
    assert common.parse_mem("8G") == 8 * 1024**3
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
    results = common.bench_main(
        pwca,
        [
            "--quick",
            "--cases",
            "N33",
            "--providers",
            *FAST_PROVIDERS,
            "--reps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-plot",
            "--no-peak",
        ],
    )
    assert len(results) == 2 * len(FAST_PROVIDERS)
    for r in results:
        assert r.status == "ok", (r.case.name, r.provider, r.status)
        assert r.median_ms > 0 and r.peak_bytes is not None and r.tflops > 0
    rows = _rows(out / "pwca-quick.csv")
    assert {(r["case"], r["provider"]) for r in rows} == {
        (c, p) for c in ("N33-fwd", "N33-fwd+bwd") for p in FAST_PROVIDERS
    }
    assert all(float(r["flops"]) > 0 for r in rows)


# ----------------------------------------------------------------------------- budgets, peaks, floors

BUDGET_TOY = textwrap.dedent("""
    import time
    import torch
    from bench.common import Case

    NAME = "budget_toy"
    BASELINE = "slow"
    FLOPS = "2e6 per call (toy)"

    def cases(quick, device, full=False):
        out = [Case("fits", dict(ms=10), device=device, flops=2e6, x=1, group="g", floor_bytes=1024 ** 2),
               Case("heavy", dict(ms=10), device=device, flops=2e6, x=2, group="g", heavy=True),
               Case("over", dict(ms=400), device=device, flops=2e6, x=3, group="g")]
        return out + ([Case("extra", dict(ms=1), device=device, x=4, group="g")] if full else [])

    def make_inputs(case):
        return case.params["ms"] / 1e3

    def fast(case, s):
        return lambda: time.sleep(s)

    def slow(case, s):
        return lambda: time.sleep(2 * s)

    PROVIDERS = dict(fast=fast, slow=slow)
""")


@pytest.fixture
def budget_module(tmp_path, monkeypatch):
    (tmp_path / "dcal_budget_toy.py").write_text(BUDGET_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("dcal_budget_toy")
    yield mod
    sys.modules.pop("dcal_budget_toy", None)


def test_plan_timing_fits_rounds_to_the_budget():
    plan = common.plan_timing([0.1, 0.2], budget=10.0, warmup=1, elapsed=2.0)
    # what is left after the memory pass (2 s) and one warm-up round (0.3 s)
    assert plan["mode"] == "rounds" and plan["round_budget"] == pytest.approx(7.7)
    assert plan["min_reps"] == common.MIN_REPS and plan["max_reps"] == common.MAX_REPS
    # the memory pass used the budget up: still MIN_REPS rounds' worth, never zero
    plan = common.plan_timing([0.1, 0.2], budget=1.5, warmup=1, elapsed=5.0)
    assert plan["round_budget"] == pytest.approx(0.3 * common.MIN_REPS)
    # warm-up + MIN_REPS rounds do not fit, or the case is heavy: one call per provider
    assert common.plan_timing([0.5, 0.5], budget=3.0, warmup=1)["mode"] == "single"
    assert common.plan_timing([0.01], budget=100.0, warmup=1, heavy=True)["mode"] == "single"
    # no budget (--reps or --full): fixed rounds; no measured call: the timing process decides
    assert common.plan_timing([0.1], budget=None, warmup=2) == {"mode": "fixed"}
    plan = common.plan_timing(None, budget=4.0, warmup=1, elapsed=1.0)
    assert plan["mode"] == "rounds" and plan["round_budget"] == pytest.approx(3.0)
    assert common.plan_timing(None, budget=4.0, warmup=1, heavy=True)["max_reps"] == 1


def test_budgeted_run_adapts_rounds_and_reports_peak_and_floor(budget_module, tmp_path, capsys):
    out = tmp_path / "results"
    t0 = time.time()
    results = common.bench_main(budget_module, ["--budget", "1.5", "--threads", "1", "--out", str(out), "--no-plot"])
    wall = time.time() - t0
    by = {(r.case.name, r.provider): r for r in results}
    assert {c for c, _ in by} == {"fits", "heavy", "over"}  # "extra" is --full only
    fits = by[("fits", "fast")]
    # 30 ms per round in a budget of 1.5 s minus the memory pass: more than the minimum, fewer than the cap
    assert common.MIN_REPS <= fits.reps < common.MAX_REPS and fits.note == ""
    assert len(fits.times_ms) == fits.reps == by[("fits", "slow")].reps
    assert fits.median_ms >= 10.0 and 0.3 <= common.time_ratio(fits, by[("fits", "slow")]) <= 0.7
    for name, note in (("heavy", "1 call (heavy)"), ("over", "1 call (over budget)")):
        r = by[(name, "fast")]
        assert r.ok and r.reps == 1 and r.note == note and r.peak_bytes is not None, r
        assert r.median_ms == r.min_ms == r.max_ms >= r.case.params["ms"]
    # matmul peak of the same run, and each row's share of it
    assert fits.peak_gflops and fits.peak_gflops > 0
    assert fits.share == pytest.approx(fits.gflops / fits.peak_gflops)
    rows = {(r["case"], r["provider"]): r for r in _rows(out / "budget_toy.csv")}
    r = rows[("fits", "fast")]
    assert float(r["floor_mib"]) == 1.0 and float(r["peak_gflops"]) > 0
    assert float(r["share_of_peak"]) == pytest.approx(float(r["gflops"]) / float(r["peak_gflops"]), rel=1e-2)
    assert int(r["reps"]) == fits.reps and rows[("heavy", "fast")]["note"] == "1 call (heavy)"
    assert r["date"] and r["load1"]
    meta = json.loads((out / "budget_toy.json").read_text())
    assert meta["budget"] == 1.5 and meta["flops_formula"] == "2e6 per call (toy)" and meta["peak_gflops"] > 0
    text = capsys.readouterr().out
    assert "budget 2 s per case" in text
    assert "case 1/3 fits" in text and "case 3/3 over" in text and "elapsed" in text and "left" in text
    assert "matmul peak" in text and "%peak" in text and "floor MiB" in text
    assert wall < 60, wall


def test_rounds_fill_the_round_budget():
    from bench.measure import _rounds

    calls = []
    fns = {"a": lambda: (calls.append("a"), time.sleep(0.01)), "b": lambda: (calls.append("b"), time.sleep(0.01))}
    emit = lambda **kw: None  # noqa: E731
    spec = dict(reps=None, round_budget=0.4, min_reps=3, max_reps=50)
    t0 = time.perf_counter()
    times, failed = _rounds(fns, spec, False, emit)
    took = time.perf_counter() - t0
    n = len(times["a"])
    # ~20 ms per round: about 20 rounds fit in 0.4 s; stops before the next round would overrun
    assert not failed and len(times["b"]) == n and 5 <= n <= 20 and took <= 0.4 + 0.1
    assert calls[:4] == ["a", "b", "a", "b"]  # interleaved
    times, _ = _rounds(fns, dict(spec, max_reps=4), False, emit)
    assert len(times["a"]) == 4
    times, _ = _rounds(fns, dict(spec, round_budget=0.0), False, emit)
    assert len(times["a"]) == 3  # at least min_reps
    times, _ = _rounds(fns, dict(reps=2), False, emit)
    assert len(times["a"]) == 2  # fixed rounds without a budget


def test_full_selects_every_case_with_fixed_rounds(budget_module):
    args = common.finish_args(common.make_parser().parse_args(["--full"]))
    assert args.budget is None and args.reps == 10 and args.warmup == 2 and args.timeout == 3000
    assert [c.name for c in common.select_cases(budget_module, args)] == ["fits", "heavy", "over", "extra"]
    args = common.finish_args(common.make_parser().parse_args(["--reps", "4"]))
    assert args.budget is None and args.reps == 4
    args = common.finish_args(common.make_parser().parse_args([]))
    assert args.budget == common.DEFAULT_BUDGET and args.reps is None
    # an exact case name selects that case only; a part of a name, every case containing it
    args = common.finish_args(common.make_parser().parse_args(["--cases", "fits", "ov"]))
    assert [c.name for c in common.select_cases(budget_module, args)] == ["fits", "over"]


def test_cases_that_match_nothing_are_a_usage_error_listing_the_cases(budget_module, capsys):
    """A mistyped ``--cases`` ends the command before anything runs, naming the pattern and the
    cases it could have been; a pattern that matches keeps the command going."""
    with pytest.raises(SystemExit) as e:
        common.bench_main(budget_module, ["--full", "--cases", "fits", "nope", "--out", "/nonexistent"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--cases nope: no case of this run matches" in err
    assert "the cases are: fits, heavy, over, extra" in err and "fits:" not in err
    parser = common.make_parser()
    args = common.finish_args(parser.parse_args(["--full", "--cases", "fit", "xtr"]))
    common.check_cases(parser, [budget_module], args)  # both match: no error
    assert args.cases == ["fit", "xtr"]


def test_flops_and_floors():
    assert common.flops_neighborhood(2, 4, 8, 9, 7, 32) == 4 * 2 * 4 * 8 * 9 * 49 * 32
    assert common.flops_neighborhood(1, 1, 2, 2, 3, 8, "fwd+bwd") == 3.5 * 4 * 4 * 9 * 8
    assert common.flops_rollout(2, 3, 10, 8, 4) == 2 * 2 * 3 * 100 * 8 * 4
    assert common.floor_outputs((2, 3), "float32", "fwd", [(2, 3)] * 5) == 24
    assert common.floor_outputs((2, 3), "bfloat16", "fwd+bwd", [(2, 3)] * 5) == 6 * 12


def test_plot_keeps_one_colour_per_provider(tmp_path):
    case_a = common.Case("a", {}, x=1, group="single")
    cases_b = [common.Case(f"b{n}", {}, x=n, group="sweep") for n in (1, 2, 4)]
    results = [
        common.Result(case_a, "dcal", median_ms=1.0, min_ms=0.9, max_ms=1.1, peak_bytes=2 * common.MIB),
        common.Result(case_a, "naive", median_ms=500.0, min_ms=400, max_ms=600, peak_bytes=900 * common.MIB),
        common.Result(case_a, "unfold", status="OOM"),
    ]
    results += [
        common.Result(c, p, median_ms=m * c.x, min_ms=m * c.x, max_ms=m * c.x, peak_bytes=common.MIB)
        for c in cases_b
        for p, m in (("dcal", 1.0), ("naive", 300.0))
    ]
    assert common.provider_colour("dcal") == common.provider_colour("dcal") != common.provider_colour("naive")
    assert common.provider_colour("some_new_provider") == common.provider_colour("some_new_provider")
    path = common.plot(str(tmp_path / "p.png"), "toy", results)
    assert os.path.getsize(path) > 1000


# ----------------------------------------------------------------------------- bench.report


def _write_results(d, rows, meta):
    import csv as _csv

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "pwca.csv", "w", newline="") as f:
        w = _csv.DictWriter(f, fieldnames=common.CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in common.CSV_FIELDS})
    (d / "pwca.json").write_text(json.dumps(meta))


def test_report_regenerates_the_readme_block(tmp_path):
    import bench.report as report

    base = dict(
        bench="pwca",
        case="N785-fwd+bwd",
        mode="fwd+bwd",
        dtype="float32",
        shape="B=2 N=785",
        device="cpu",
        device_name="Some CPU (2 cores)",
        torch="2.14.1",
        commit="abc123",
        threads="2",
        date="2026-12-02 10:00 UTC",
        flops="2.65e+10",
        floor_mib="27.60",
        baseline="sdpa_cat",
    )
    rows = [
        dict(
            base,
            provider="sdpa_cat",
            median_ms="1118.7",
            min_ms="1100",
            max_ms="1200",
            reps="5",
            gflops="23.7",
            peak_gflops="36.4",
            share_of_peak="0.651",
            peak_mib="52.50",
            time_vs_base="1.0000",
            mem_vs_base="1.0000",
            status="ok",
        ),
        dict(
            base,
            provider="dcal",
            median_ms="900.0",
            min_ms="890",
            max_ms="950",
            reps="5",
            gflops="29.4",
            peak_gflops="36.4",
            share_of_peak="0.808",
            peak_mib="27.70",
            time_vs_base="0.8000",
            mem_vs_base="0.5300",
            status="ok",
        ),
        dict(base, provider="flex", status="skipped: FlexAttention has no CPU backward"),
    ]
    meta = dict(
        bench="pwca",
        date="2026-12-02 10:00 UTC",
        commit="abc123",
        loadavg_start="1.00 1.00 1.00",
        loadavg="2.00 1.50 1.20",
        peak_gflops=36.4,
        budget=20.0,
        wall_s=90.0,
        flops_formula="4*Nq*Nk*D per head forward",
    )
    _write_results(tmp_path / "results", rows, meta)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\nintro\n\n{report.START}\nold typed table\n{report.END}\n\n## Next\n")
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old typed table" not in text and text.startswith("# x\n\n## Results\n\nintro\n") and "## Next" in text
    block = text[text.index(report.START) : text.index(report.END)]
    for want in (
        "Some CPU (2 cores)",
        "2026-12-02 10:00 UTC",
        "abc123",
        "1.00 1.00 1.00 -> 2.00 1.50 1.20",
        "pwca 36 GFLOP/s",
        "dcal 900.0 ms, 29 GFLOP/s (81% of peak)",
        "floor 27.6 MiB",
        "dcal: 0.80x time, 0.53x memory (vs sdpa_cat)",
        "`python -m bench.pwca --cases N785-fwd+bwd`",
        "skipped (FlexAttention has no CPU backward)",
        "4*Nq*Nk*D per head forward",
    ):
        assert want in block, want
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "## pwca" in summary and "| dcal | 900.0 ms |" in summary
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench-results:start"):
        report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    assert report.main(["--results", str(tmp_path / "empty"), "--readme", str(readme)]) == 1


# ----------------------------------------------------------------------------- FlexAttention peers

from bench import flex as fx  # noqa: E402


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
def test_flex_block_mask_matches_the_window_rule(border):
    X, Y, k, block = 13, 29, 7, 16
    mm = fx.na_mask_mod(X, Y, k, border)
    nkv = fx.kv_len(X, Y, k, border)
    bm = fx.na_block_mask(X, Y, k, border, block=block)
    dense = mm(0, 0, torch.arange(X * Y)[:, None], torch.arange(nkv)[None, :])
    # every query sees exactly k*k keys (zero: padded positions count, as in unfold)
    want_keys = k * k if border != "mask" else None
    if want_keys:
        assert (dense.sum(-1) == want_keys).all()
    nq, nk = -(-X * Y // block), -(-nkv // block)
    pad = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    pad[: X * Y, :nkv] = dense
    tiles = pad.view(nq, block, nk, block)
    any_b, all_b = tiles.any(3).any(1), tiles.all(3).all(1)
    got = bm.to_dense()[0, 0].bool()  # blocks flex visits (partial or full)
    assert torch.equal(got, any_b)
    full = torch.zeros_like(any_b)
    for i in range(nq):
        n = int(bm.full_kv_num_blocks[0, 0, i])
        full[i, bm.full_kv_indices[0, 0, i, :n].long()] = True
    assert torch.equal(full, all_b)
    # the generic builder (any mask_mod, chunked, banded) agrees, with a band of key rows per chunk
    generic = fx.block_mask(mm, X * Y, nkv, block=block, chunk_rows=3 * block, kv_span=lambda q0, q1: (0, nkv))
    assert torch.equal(generic.to_dense(), bm.to_dense())
    assert torch.equal(generic.full_kv_num_blocks, bm.full_kv_num_blocks)


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
def test_flex_neighborhood_matches_the_reference(border):
    import dcal.ops

    g = torch.Generator().manual_seed(0)
    X, Y, k = 9, 21, 5
    q, kk, v = (torch.randn(1, 2, X, Y, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bm = fx.na_block_mask(X, Y, k, border, block=16)
    got = fx.flex_neighborhood(q, kk, v, k, border, bm, fx.flex_fn(compiled=False))
    want = dcal.ops.neighborhood_attention2d(q, kk, v, kernel_size=k, border=border, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_flex_pwca_and_refusals():
    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(1, 2, 11, 16, generator=g, dtype=torch.float64) for _ in range(5))
    got = fx.flex_concat(q, k1, v1, k2, v2, fx.flex_fn(compiled=False))
    torch.testing.assert_close(got, pwca.naive_pwca(q, k1, v1, k2, v2), atol=1e-10, rtol=1e-10)
    assert "no CPU backward" in fx.unavailable_reason("cpu", "fwd+bwd")
    assert fx.unavailable_reason("cpu", "fwd") is None
    with pytest.raises(ValueError, match="border must be one of"):
        fx.na_mask_mod(4, 4, 3, "wrap")


# ----------------------------------------------------------------------------- roofline on paper


def test_roofline_counts_and_occupancy():
    from bench import roofline as rl

    # 168 registers x 128 threads -> 5376 per warp... 4 warps: 65536 // (168*32 rounded to 256 = 5376) = 12 warps
    occ = rl.occupancy(168, 24 * 1024, 4)
    assert occ["ctas_per_sm"] == 3 and occ["limit"] == "regs" and occ["occupancy"] == pytest.approx(12 / 64)
    occ = rl.occupancy(32, 100 * 1024, 4)
    assert occ["ctas_per_sm"] == 2 and occ["limit"] == "smem"
    s = rl.DCAL
    for dtype in (torch.float16, torch.bfloat16):
        launches = rl.pwca_launches(dtype)
        fwd = 4.0 * s["B"] * s["H"] * s["NQ"] * (s["NK1"] + s["NK2"]) * s["D"]
        assert sum(l.useful_flops for l in launches) == pytest.approx(3.5 * fwd, rel=1e-3)
        assert all(l.exec_flops >= l.useful_flops and l.bytes_tiled >= l.bytes_min > 0 for l in launches)
        b = rl.BEV
        launches = rl.na2d_launches(dtype)
        fwd = 4.0 * b["B"] * b["H"] * b["X"] * b["Y"] * b["KS"] ** 2 * b["D"]
        assert sum(l.useful_flops for l in launches) == pytest.approx(3.5 * fwd, rel=1e-3)
    # every chosen launch is a configuration the kernel modules declare for compilation
    from dcal.testing.aot import all_specs

    specs = all_specs()
    for launch in rl.pwca_launches(torch.float16) + rl.na2d_launches(torch.bfloat16):
        assert rl.find_spec(launch, torch.float16 if launch.op == "pwca" else torch.bfloat16, specs) is not None, (
            launch.kernel
        )
    lines = rl.table(rl.pwca_launches(torch.float16))
    assert lines[-1].startswith("total: useful") and "?" in lines[2]  # not compiled here: occupancy unknown


# ----------------------------------------------------------------------------- bench.neighborhood

import bench.neighborhood as nbh  # noqa: E402


def test_neighborhood_providers_follow_the_case_border():
    import dcal.ops

    for case in [c for c in nbh.cases(True, "cpu") if c.mode == "fwd"]:
        border = case.params["border"]
        q, k, v, _ = nbh.make_inputs(case)
        H = case.params["H"]
        want = dcal.ops.neighborhood_attention2d(
            *(nbh._heads(t.double(), H) for t in (q, k, v)),
            kernel_size=case.params["ks"],
            border=border,
            backend="reference",
        )
        want = nbh._channels(want, q.shape)
        torch.testing.assert_close(nbh.dcal(case, (q, k, v, None))().double(), want, atol=1e-5, rtol=1e-5)
        if border == "zero":
            torch.testing.assert_close(nbh.unfold(case, (q, k, v, None))().double(), want, atol=1e-5, rtol=1e-5)
        else:
            with pytest.raises(common.Unavailable, match="zero-padding"):
                nbh.unfold(case, (q, k, v, None))
            assert case.baseline == "natten"
    heavy = [c.name for c in nbh.cases(False, "cpu") if c.heavy]
    assert heavy == ["B2-C256-256x256-fwd+bwd"]
