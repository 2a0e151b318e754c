"""The memory budget as a user sees it: ``--max-memory`` bounds the process's peak (resident set
on CPU), refusals are one line before any work, and the predictor against measured peaks."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dcal.train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
SHORT = [
    "--set",
    "train.progress=false",
    "--set",
    "train.epochs=1",
    "--set",
    "train.max_steps=2",
    "--set",
    "data.val_size=40",
    "--set",
    "data.train_size=256",
]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)
    return e


def one_error_line(err, *names):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("value", ["16", "1000", "0.5"])
def test_bare_number_under_a_mebibyte_is_refused(tmp_path, capsys, value):
    from dcal.train.__main__ import main

    out = tmp_path / "o"
    assert main(["--config", DEMO, "--out", str(out), "--max-memory", value, "--micro-batch", "8"]) == 2
    line = one_error_line(capsys.readouterr().err, "--max-memory", "unit")
    assert "16GB" in line or "GB" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("16GB", 16 * 2**30),
        ("200MB", 200 * 2**20),
        ("512MiB", 512 * 2**20),
        ("1.5g", int(1.5 * 2**30)),
        (2**20, 2**20),
        ("1048576", 2**20),
    ],
)
def test_budget_units(value, expected):
    assert C.parse_bytes(value, "--max-memory") == expected


def test_budget_too_small_for_one_sample_is_one_line(tmp_path, capsys):
    from dcal.train.__main__ import main

    out = tmp_path / "o"
    assert main(["--config", DEMO, "--out", str(out), "--max-memory", "1MB", "--micro-batch", "auto", *SHORT]) == 2
    line = one_error_line(capsys.readouterr().err, "max_memory", "micro-batch of 1")
    assert "held before the first step" in line
    assert not out.exists()


def test_fixed_micro_batch_is_checked_against_the_budget(tmp_path, capsys):
    from dcal.train.__main__ import main

    out = tmp_path / "o"
    # the process alone holds hundreds of MiB (torch, the data, the model): 100MB cannot hold a step
    assert main(["--config", DEMO, "--out", str(out), "--max-memory", "100MB", "--micro-batch", "32", *SHORT]) == 2
    one_error_line(capsys.readouterr().err, "max_memory", "train.micro_batch 32", "predicted to peak at")
    assert not out.exists()


def run_train(out, *args):
    r = subprocess.run(
        [sys.executable, "-m", "dcal.train", "--config", DEMO, "--out", str(out), *SHORT, *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def test_chosen_micro_batch_peak_is_within_the_budget(tmp_path):
    # what the process holds before its first step, read from a run with a budget that holds all
    err = run_train(tmp_path / "a", "--max-memory", "64GB", "--micro-batch", "auto")
    held = float(re.search(r"\(([0-9.]+) MiB held before the first step\)", err).group(1))
    assert "micro-batch 64 of 64" in err and "peak RSS" in err
    # a budget that leaves room for about half the demo's group
    budget = held + 40
    # two epochs: an evaluation (and the drawing of curves.png) between the steps
    err = run_train(
        tmp_path / "b",
        "--max-memory",
        f"{budget}MiB",
        "--micro-batch",
        "auto",
        "--set",
        "train.epochs=2",
        "--set",
        "train.max_steps=0",
    )
    chosen = int(re.search(r"memory: micro-batch (\d+) of 64", err).group(1))
    assert 1 <= chosen < 64, err
    assert "within the budget" in err, err
    row = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")][-1]
    assert row["micro_batch"] == chosen
    assert row["peak_mem_mb"] <= budget, (row, budget)
    steps = [json.loads(line) for line in open(tmp_path / "b" / "steps.jsonl")]
    assert len(steps) == 8 and all(s["peak_mem_mb"] <= budget for s in steps), steps
    assert (tmp_path / "b" / "curves.png").exists()


def test_autobatch_cli_table_and_refusals():
    r = subprocess.run(
        [sys.executable, "-m", "dcal.train.autobatch", "--config", DEMO, "--micro-batch", "4,8", "--max-memory", "1MB"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and not r.stdout.lstrip().startswith("{"), (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert "micro-batch" in lines[1] and "within 1 MiB" in lines[1]
    body = [line.split() for line in lines[3:]]
    assert [b[0] for b in body] == ["4", "8"] and all(b[-1] == "no" for b in body)
    assert float(body[0][2]) < float(body[1][2])  # resident prediction grows with the micro-batch
    r = subprocess.run(
        [sys.executable, "-m", "dcal.train.autobatch", "--config", DEMO, "--micro-batch", "0"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    one_error_line(r.stderr, "--micro-batch")


def test_resident_prediction_counts_heap_overhead_on_small_storages():
    from dcal.train.autobatch import CPU_HEAP_OVERHEAD, CPU_HEAP_SMALL, StorageTracker

    tr = StorageTracker(heap_overhead=CPU_HEAP_OVERHEAD)
    with tr:
        small = torch.empty(CPU_HEAP_SMALL // 8, dtype=torch.float32)  # half the threshold: heap
        big = torch.empty(CPU_HEAP_SMALL // 2, dtype=torch.float32)  # twice the threshold: mmapped
    n_small, n_big = small.untyped_storage().nbytes(), big.untyped_storage().nbytes()
    assert tr.peak == n_small + n_big
    assert tr.resident_peak == pytest.approx(n_small * CPU_HEAP_OVERHEAD + n_big)
    del small, big
    assert tr.live == 0 and tr.small_live == 0


def test_fixed_micro_batch_near_the_budget_warns_with_the_prediction(tmp_path):
    # a budget between the fixed micro-batch's prediction and its +15% band: runs, with a warning
    err = run_train(tmp_path / "a", "--max-memory", "64GB", "--micro-batch", "32")
    peak = float(re.search(r"predicted step peak ([0-9.]+) MiB", err).group(1))
    held = float(re.search(r"\(([0-9.]+) MiB held before the first step\)", err).group(1))
    budget = peak + 0.05 * (peak - held)
    err = run_train(tmp_path / "b", "--max-memory", f"{budget:.1f}MiB", "--micro-batch", "32")
    assert re.search(r"warning: micro-batch 32 is predicted to peak at [0-9.]+ MiB, under the budget", err), err


def test_help_says_what_the_budget_bounds(capsys):
    from dcal.train.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak resident set (RSS) on CPU" in text and "max_memory_allocated on GPU" in text
