"""bench.report on the repository's own CSVs: the results page and summary.md are what the kept
CSVs give (so a clone can check them), the commit and a dirty tree are stated, the --quick
CSVs stand in only when no default run is there, and the plots are drawn from the CSVs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import bench.report as report
from bench.tables import CSV_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_results_page_matches_its_csvs():
    r = subprocess.run(
        [sys.executable, "-m", "bench.report", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"docs/results.md or bench/results/summary.md is stale:\n{r.stdout}\n{r.stderr}"
    assert "up to date" in r.stdout


def _csv(d, name, commit, quick, rows=()):
    stem = d / (name + ("-quick" if quick else ""))
    row = dict(
        bench=name,
        case="N33-fwd",
        provider="dcal",
        mode="fwd",
        dtype="float32",
        shape="B=1 N=33",
        device="cpu",
        device_name="Some CPU (2 cores)",
        torch="2.14.1",
        commit=commit,
        threads="2",
        date="2026-12-03 08:13 UTC",
        flops="557568",
        median_ms="6.5",
        min_ms="6.0",
        max_ms="7.0",
        reps="3",
        gflops="0.08",
        peak_gflops="197",
        share_of_peak="0.0004",
        peak_mib="0.03",
        floor_mib="0.01",
        status="ok",
    )
    d.mkdir(parents=True, exist_ok=True)
    with open(str(stem) + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows or [{}]:
            w.writerow({k: dict(row, **r).get(k, "") for k in CSV_FIELDS})
    meta = dict(
        bench=name,
        date=row["date"],
        commit=commit,
        quick=quick,
        budget=3.0 if quick else 20.0,
        wall_s=10.0,
        loadavg_start="1 1 1",
        loadavg="2 2 2",
        peak_gflops=197.0,
    )
    (d / (stem.name + ".json")).write_text(json.dumps(meta))


def _page(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\n{report.START}\n{report.END}\n")
    return page


def test_quick_fallback_dirty_commit_and_check(tmp_path, capsys):
    res = tmp_path / "results"
    _csv(res, "pwca", "abc123456789+dirty", quick=True)
    page = _page(tmp_path)
    args = ["--results", str(res), "--page", str(page), "--no-plot", "--guide", "none"]
    assert report.main(args + ["--check"]) == 1  # nothing generated yet
    assert report.main(args) == 0
    err = capsys.readouterr().err
    assert "using those of `python -m bench --quick`" in err and "uncommitted changes" in err
    text = page.read_text()
    assert "commit abc123456789 with uncommitted changes (dirty)" in text
    assert "`python -m bench --quick` (small shapes" in text
    assert "`python -m bench.pwca --cases N33-fwd --quick`" in text
    assert report.main(args + ["--check"]) == 0
    # summary.md is checked too: a hand edit is caught
    summary = res / "summary.md"
    summary.write_text(summary.read_text() + "typed by hand\n")
    assert report.main(args + ["--check"]) == 1
    assert "summary.md" in capsys.readouterr().out


def test_default_run_preferred_and_clean_commit(tmp_path):
    res = tmp_path / "results"
    _csv(res, "pwca", "abc123456789+dirty", quick=True)
    _csv(res, "pwca", "def456789012", quick=False)
    page = _page(tmp_path)
    assert report.main(["--results", str(res), "--page", str(page), "--no-plot", "--guide", "none"]) == 0
    text = page.read_text()
    assert "commit def456789012 (clean)" in text and "abc123456789" not in text
    assert "`python -m bench` (`make bench`)" in text and "--quick`" not in text


def test_plots_drawn_from_the_csvs(tmp_path):
    pytest.importorskip("matplotlib")
    res = tmp_path / "results"
    res.mkdir()
    for f in os.listdir(os.path.join(ROOT, "bench", "results")):
        if f.endswith((".csv", ".json")):
            shutil.copy(os.path.join(ROOT, "bench", "results", f), res / f)
    page = _page(tmp_path)
    assert report.main(["--results", str(res), "--page", str(page), "--guide", "none"]) == 0
    stems = {f[:-4] for f in os.listdir(res) if f.endswith(".csv")}
    assert stems
    for stem in stems:
        png = res / (stem + ".png")
        assert png.exists() and png.stat().st_size > 1000, png


def test_headline_figures_of_the_guide(tmp_path, capsys):
    res = tmp_path / "results"
    rows = {  # (case, provider, median ms, peak MiB, status)
        "neighborhood": [
            ("B1-C128-128x128-fwd+bwd", "dcal", "109.4", "34.1", "ok"),
            ("B1-C128-128x128-fwd+bwd", "unfold", "3162.1", "1600", "ok"),
        ],
        "train_step": [
            ("B2-448px", "fused", "32980", "2193", "ok"),
            ("B2-448px", "materialising", "48710", "5020", "ok"),
        ],
        "rollout": [
            ("N785-L12", "cpp", "966.2", "0.24", "ok"),
            ("N785-L12", "compiled", "1254.3", "70.7", "ok"),
        ],
    }
    for name, rs in rows.items():
        _csv(
            res,
            name,
            "0123456789ab",
            quick=False,
            rows=[dict(case=c, provider=p, median_ms=t, peak_mib=m, status=st) for c, p, t, m, st in rs],
        )
    page, guide = _page(tmp_path), tmp_path / "README.md"
    guide.write_text(f"# dcal\n\n## What it buys\n\n{report.HEAD_START}\nhand-written\n{report.HEAD_END}\n\n## Next\n")
    args = [
        "--results",
        str(res),
        "--page",
        str(page),
        "--no-plot",
        "--guide",
        str(guide),
    ]
    assert report.main(args + ["--check"]) == 1
    assert str(guide) in capsys.readouterr().out
    assert report.main(args) == 0
    text = guide.read_text()
    assert "hand-written" not in text and text.startswith("# dcal\n\n## What it buys\n\n") and "## Next" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("<!--")) <= 100
    flat = " ".join(text.split())  # the figures are wrapped at 100 columns
    for want in (
        "34.1 MiB of peak memory where `F.unfold` takes 1600 MiB (0.02x), in 0.03x its time",
        "0.44x the peak memory (2193 MiB against 5020 MiB) and 0.68x the time",
        "0.24 MiB beyond the inputs where the compiled dense rollout takes 70.7 MiB (1/295), in 0.77x",
        "`python -m bench.rollout --cases N785-L12`",
        "commit 0123456789ab (clean)",
    ):
        assert want in flat, want
    assert report.main(args + ["--check"]) == 0
    # a run without one of the rows leaves the figures alone and says so
    os.remove(res / "rollout.csv")
    guide.write_text(text.replace("0.77x", "0.5x"))
    assert report.main(args) == 0
    assert "0.5x" in guide.read_text() and "headline figures left as they are" in capsys.readouterr().err


# ----------------------------------------------------------------------------- targets and verdicts


def _rows(**by_provider):
    """CSV-like rows of one case: provider=(median ms, peak MiB, share of peak, status)."""
    return [
        dict(
            provider=p,
            median_ms=str(t),
            peak_mib=str(m),
            share_of_peak=str(s),
            status=st,
        )
        for p, (t, m, s, st) in by_provider.items()
    ]


@pytest.mark.parametrize(
    "target,rows,want",
    [
        # time and memory ratios to another provider
        (
            report.Target("time", "<=", 0.5, "materialising", ("fused",)),
            _rows(fused=(11000, 2200, 0.58, "ok"), materialising=(30000, 5000, 0.21, "ok")),
            ("met", "met (0.37x time)"),
        ),
        (
            report.Target("time", "<=", 0.3, "materialising", ("fused",)),
            _rows(fused=(11000, 2200, 0.58, "ok"), materialising=(30000, 5000, 0.21, "ok")),
            ("short", "short: 0.37x time, target <= 0.3x"),
        ),
        (
            report.Target("memory", "<=", 0.4, "materialising", ("fused",)),
            _rows(fused=(11000, 1900, 0.58, "ok"), materialising=(30000, 5000, 0.21, "ok")),
            ("met", "met (0.38x memory)"),
        ),
        (
            report.Target("memory", "<=", 0.4, "materialising", ("fused",)),
            _rows(fused=(11000, 2200, 0.58, "ok"), materialising=(30000, 5000, 0.21, "ok")),
            ("short", "short: 0.44x memory, target <= 0.4x"),
        ),
        # close to the bound: a third digit tells the figure from it
        (
            report.Target("memory", "<=", 0.4, "materialising", ("fused",)),
            _rows(fused=(11000, 2002, 0.58, "ok"), materialising=(30000, 5000, 0.21, "ok")),
            ("short", "short: 0.400x memory, target <= 0.4x"),
        ),
        # strictly faster
        (
            report.Target("time", "<", 1, "flex"),
            _rows(dcal=(10, 9, 0.12, "ok"), flex=(400, 33, 0.003, "ok")),
            ("met", "met (0.03x time)"),
        ),
        (
            report.Target("time", "<", 1, "flex"),
            _rows(dcal=(10, 9, 0.12, "ok"), flex=(10, 33, 0.003, "ok")),
            ("short", "short: 1.000x time, target < 1x"),
        ),
        # share of the matmul peak
        (
            report.Target("peak", ">=", 0.35),
            _rows(dcal=(10, 9, 0.41, "ok")),
            ("met", "met (41% of peak)"),
        ),
        (
            report.Target("peak", ">=", 0.35),
            _rows(dcal=(10, 9, 0.12, "ok")),
            ("short", "short: 12% of peak, target >= 35%"),
        ),
        # absolute memory: a run that does not complete falls short
        (
            report.Target("peak_mib", "<=", 2048),
            _rows(dcal=(916, 565, 0.07, "ok")),
            ("met", "met (565 MiB)"),
        ),
        (
            report.Target("peak_mib", "<=", 2048),
            _rows(dcal=(916, 2500, 0.07, "ok")),
            ("short", "short: 2500 MiB, target <= 2 GiB"),
        ),
        (
            report.Target("peak_mib", "<=", 2048),
            _rows(dcal=("", "", "", "OOM")),
            ("short", "short: OOM, target <= 2 GiB"),
        ),
        # no figure to judge: the other provider failed, or ours was skipped
        (
            report.Target("time", "<=", 0.5, "unfold"),
            _rows(dcal=(10, 9, 0.12, "ok"), unfold=("", "", "", "OOM")),
            ("n/a", "not measured (unfold OOM)"),
        ),
        (
            report.Target("time", "<=", 1, "compiled", ("triton",)),
            _rows(
                triton=("", "", "", "skipped: needs CUDA"),
                compiled=(400, 70, 0.16, "ok"),
            ),
            ("n/a", "not measured (skipped (needs CUDA))"),
        ),
    ],
)
def test_verdict_met_short_and_not_measured(target, rows, want):
    got = report.verdicts(target, rows)
    assert len(got) == 1 and got[0][1:] == want, got


def test_verdict_against_the_baseline_judges_the_ratio_the_table_prints():
    """The table's t/base is the median of the per-round ratios of interleaved calls; a verdict
    against the row's baseline judges that figure, not the ratio of the two medians (which can
    round to another side of the bound); against another provider, the ratio of medians."""
    rows = _rows(dcal=(98.6, 31.2, 0.8, "ok"), sdpa_cat=(121.5, 52.5, 0.65, "ok"), compiled=(98.0, 52.6, 0.6, "ok"))
    for r in rows:
        r["baseline"] = "sdpa_cat"
    rows[0].update(time_vs_base="0.8165", mem_vs_base="0.5936")
    got = report.verdicts(report.Target("time", "<=", 0.7, "sdpa_cat"), rows)
    assert got == [("dcal", "short", "short: 0.82x time, target <= 0.7x")]
    assert report.verdicts(report.Target("time", "<=", 0.817, "sdpa_cat"), rows)[0][1] == "met"
    assert report.verdicts(report.Target("memory", "<=", 0.6, "sdpa_cat"), rows)[0][2] == "met (0.59x memory)"
    # not the row's baseline: the ratio of medians (98.6 / 98.0)
    assert report.verdicts(report.Target("time", "<=", 1, "compiled"), rows)[0][2] == "short: 1.01x time, target <= 1x"


def test_verdicts_of_every_provider_of_ours_that_ran():
    rows = _rows(
        cpp=(120, 1.4, 0.5, "ok"),
        cpp_lse=(300, 1.5, 0.57, "ok"),
        triton=("", "", "", "skipped: no GPU"),
        compiled=(200, 70, 0.16, "ok"),
    )
    got = report.verdicts(report.Target("time", "<=", 1, "compiled"), rows)
    assert [(p, k) for p, k, _ in got] == [("cpp", "met"), ("cpp_lse", "short")]
    cell = report.target_cell("rollout", "N785-L12", [dict(r, provider=r["provider"]) for r in rows])
    assert "cpp: met (0.60x time); cpp_lse: short: 1.50x time, target <= 1x" in cell


def test_targets_are_structured_and_checked():
    for (bench, case), clauses in report.TARGETS.items():
        assert bench in report.BENCHES and clauses
        assert all(isinstance(t, report.Target) and t.text() for t in clauses)
    assert report.Target("memory", "<=", 0.4, "materialising", ("fused",)).text() == (
        "fused <= 0.4x memory of materialising"
    )
    assert report.Target("peak", ">=", 0.35).text() == ">= 35% of peak"
    assert report.Target("peak_mib", "<=", 2048).text() == "completes in <= 2 GiB"
    assert report.Target("time", "<", 1, "flex").text() == "faster than flex"
    with pytest.raises(ValueError, match="metric"):
        report.Target("speed", "<=", 1, "x")
    with pytest.raises(ValueError, match="op"):
        report.Target("time", "==", 1, "x")
    with pytest.raises(ValueError, match="versus"):
        report.Target("time", "<=", 1)
    with pytest.raises(ValueError, match="versus"):
        report.Target("peak", ">=", 0.3, "x")


def test_verdicts_in_the_page_and_summary(tmp_path):
    res = tmp_path / "results"
    rows = [
        dict(
            case="B2-448px",
            provider="materialising",
            median_ms="30000",
            peak_mib="5000",
            status="ok",
        ),
        dict(
            case="B2-448px",
            provider="fused",
            median_ms="11000",
            peak_mib="2200",
            status="ok",
        ),
    ]
    _csv(res, "train_step", "0123456789ab", quick=False, rows=rows)
    page = _page(tmp_path)
    assert report.main(["--results", str(res), "--page", str(page), "--no-plot", "--guide", "none"]) == 0
    want_time = "fused <= 0.5x time of materialising: **met (0.37x time)**"
    want_mem = "fused <= 0.4x memory of materialising: **short: 0.44x memory, target <= 0.4x**"
    assert want_time in page.read_text() and want_mem in page.read_text()
    summary = (res / "summary.md").read_text()
    assert "1 met, 1 short, 0 not measured here" in summary
    assert (
        "| train_step | B2-448px | fused <= 0.4x memory of materialising | short: 0.44x memory, target <= 0.4x |"
        in (summary)
    )
