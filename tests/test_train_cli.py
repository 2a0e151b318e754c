"""The CLI end to end in subprocesses: a smoke run, config errors, resume, DDP under torchrun
(2 gloo processes equal 1 process with the same global batch), and the memory prediction of the
demo model against a measured CPU peak."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from train_configs import TINY_MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = TINY_MLP


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)
    return e


def run(args, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "dcal.train", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def write_config(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def final_state(out):
    ck = sorted(p for p in os.listdir(os.path.join(out, "checkpoints")) if p.startswith("step-"))[-1]
    return torch.load(os.path.join(out, "checkpoints", ck), weights_only=True)


def rows(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_cli_smoke(tmp_path):
    # the real command line, in a fresh process
    out = str(tmp_path / "run")
    r = run(["--config", write_config(tmp_path, TINY), "--out", out, "--set", "train.max_steps=3"])
    assert r.returncode == 0, r.stderr
    (row,) = rows(out)
    for key in ("epoch", "step", "train_loss", "val_acc", "peak_mem_mb", "effective_batch"):
        assert key in row
    assert row["step"] == 3 and row["effective_batch"] == 8 and row["micro_batch"] == 2
    assert row["peak_mem_mb"] > 0 and 0.0 <= row["val_acc"] <= 1.0 and math.isfinite(row["train_loss"])
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["train"]["max_steps"] == 3 and saved["model"]["name"] == "mlp"


def test_cli_resume_continues_exactly(tmp_path):
    from dcal.train.__main__ import main

    cfg = write_config(tmp_path, TINY)
    out, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    two = ["--set", "train.epochs=2"]
    assert main(["--config", cfg, "--out", out, *two, "--set", "train.max_steps=4"]) == 0
    first = rows(out)
    assert len(first) == 1 and first[0]["step"] == 4 and first[0]["epoch"] == 0  # inside epoch 0 (6 steps)
    assert main(["--config", cfg, "--out", out, *two, "--resume"]) == 0
    resumed = rows(out)
    assert [x["epoch"] for x in resumed] == [0, 0, 1] and resumed[-1]["step"] == 12
    assert main(["--config", cfg, "--out", straight, *two]) == 0
    a, b = final_state(out), final_state(straight)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert rows(straight)[-1]["train_loss"] == resumed[-1]["train_loss"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.epochz=2"], "train.epochz"),
        (["--set", "train.amp=fp8"], "train.amp"),
        (["--set", "model.hiden=3"], "model.hiden"),
        (["--set", "data.img_sise=3"], "data.img_sise"),
        (["--set", "model.name=resnet"], "model.name"),
        (["--max-memory", "sixteen"], "--max-memory"),
    ],
    ids=["train_key", "train_value", "model_key", "data_key", "model_name", "memory"],
)
def test_cli_rejects_bad_config(tmp_path, capsys, args, message):
    from dcal.train.__main__ import main

    assert main(["--config", write_config(tmp_path, TINY), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    # 44 samples, global batch 8: 5 full groups + a short one of 4 (2 per process)
    cfg = write_config(tmp_path, TINY)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run(["--config", cfg, "--out", one])
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "dcal.train",
            "--config",
            cfg,
            "--out",
            two,
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    s1, s2 = final_state(one), final_state(two)
    assert s2["world"] == 2 and s1["world"] == 1 and s1["step"] == s2["step"] == 6
    for k in s1["model"]:
        # the same samples per step; only the order of the gradient sums differs
        torch.testing.assert_close(s2["model"][k], s1["model"][k], atol=1e-6, rtol=1e-5)
    (row1,), (row2,) = rows(one), rows(two)  # rank 0 alone writes metrics
    assert row2["world_size"] == 2 and row2["effective_batch"] == row1["effective_batch"] == 8
    assert row2["val_acc"] == row1["val_acc"]
    assert row2["train_loss"] == pytest.approx(row1["train_loss"], rel=1e-5)


def test_meta_prediction_matches_measured_cpu_peak_of_demo_model():
    pytest.importorskip("dcal.models", reason="needs dcal.models").DCALViT
    # predicted: tensors on fake inputs plus glibc's heap overhead; measured: the peak resident set
    # of a fresh process (no allocator setting): within 15%, printed as a table without warnings
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcal.train.autobatch",
            "--config",
            "configs/demo.yaml",
            "--micro-batch",
            "32",
            "--max-memory",
            "64GB",
            "--measure",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr
    lines = r.stdout.strip().splitlines()
    header = lines[1].split("  ")
    header = [h.strip() for h in header if h.strip()]
    assert header[:5] == ["micro-batch", "tensors MiB", "predicted MiB", "measured MiB", "error"], lines
    assert set(lines[2]) <= {"-", " "}
    cells = lines[3].split()
    assert cells[0] == "32" and cells[-1] == "yes"
    predicted, measured = float(cells[2]), float(cells[3])
    assert measured > 10
    assert abs(predicted - measured) <= 0.15 * measured, lines


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_cli_resume_skips_truncated_newest_checkpoint(tmp_path, capsys):
    from dcal.train.__main__ import main

    cfg = write_config(tmp_path, TINY)
    out, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    two = ["--set", "train.epochs=2", "--set", "train.save_every_steps=1", "--set", "train.keep_last=3"]
    assert main(["--config", cfg, "--out", out, *two, "--set", "train.max_steps=4"]) == 0
    ckdir = os.path.join(out, "checkpoints")
    newest = os.path.join(ckdir, "step-00000004.pt")
    assert sorted(os.listdir(ckdir))[-1] == "step-00000004.pt"
    truncate(newest)  # a copy cut short, a full disk
    capsys.readouterr()
    assert main(["--config", cfg, "--out", out, *two, "--resume"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-00000004.pt" in warnings[0] and "cannot be read" in warnings[0], err
    assert "resumed from" in err and "step-00000003.pt" in err and "step 3" in err
    assert "Traceback" not in err
    assert main(["--config", cfg, "--out", straight, *two]) == 0
    a, b = final_state(out), final_state(straight)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit-identical to the uninterrupted run
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert rows(straight)[-1]["train_loss"] == rows(out)[-1]["train_loss"]


def test_cli_resume_with_no_readable_checkpoint_says_so_in_one_line(tmp_path, capsys):
    from dcal.train.__main__ import main

    cfg = write_config(tmp_path, TINY)
    out = str(tmp_path / "run")
    assert main(["--config", cfg, "--out", out, "--set", "train.save_every_steps=1", "--set", "train.max_steps=2"]) == 0
    ckdir = os.path.join(out, "checkpoints")
    for name in os.listdir(ckdir):
        if name.startswith("step-"):
            truncate(os.path.join(ckdir, name), 0.3)
    capsys.readouterr()
    assert main(["--config", cfg, "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "can be read" in errors[0] and "without --resume" in errors[0], err
    assert "Traceback" not in err and err.count("warning: skipping") == 2
    # an explicit unreadable path: one line too
    bad = os.path.join(ckdir, "step-00000002.pt")
    assert main(["--config", cfg, "--out", out, "--resume", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "step-00000002.pt" in err and err.count("\n") == 1
