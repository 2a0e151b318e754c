"""One run per --out folder (refusal, --overwrite moves the old run aside, --resume compares the
configs, a finished run says so), --eval-only (top-1 / top-5 / per-class CSV without touching
the run) and rounded console metrics."""

import csv
import json
import os

import pytest
import torch
import yaml

from dcal.train.__main__ import main
from train_configs import TINY_MLP

TINY = TINY_MLP


def write(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    out = str(tmp_path / "run")
    assert main(["--config", cfg, "--out", out, "--set", "train.max_steps=2"]) == 0
    old = sorted(os.listdir(os.path.join(out, "checkpoints")))
    old_rows = rows(out)
    assert main(["--config", cfg, "--out", out, "--set", "train.max_steps=3"]) == 2  # refused
    capsys.readouterr()
    assert main(["--config", cfg, "--out", out, "--overwrite", "--set", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.old-")]
    assert len(aside) == 1 and f"aside to {os.path.join(str(tmp_path), aside[0])}" in err, err
    moved = os.path.join(tmp_path, aside[0])
    assert sorted(os.listdir(os.path.join(moved, "checkpoints"))) == old and rows(moved) == old_rows
    new = rows(out)
    assert len(new) == 1 and new[0]["step"] == 3  # the new run alone in its folder
    assert len([json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]) == 3


def test_a_folder_with_only_a_config_takes_a_new_run(tmp_path):
    # a run stopped before its first step leaves config.yaml alone: nothing of a run to keep
    cfg = write(tmp_path, TINY)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}\n")
    assert main(["--config", cfg, "--out", str(out), "--set", "train.max_steps=1"]) == 0


def test_resume_lists_changed_settings_and_finished_run_exits_0(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    out = str(tmp_path / "run")
    assert main(["--config", cfg, "--out", out, "--set", "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert (
        main(["--config", cfg, "--out", out, "--resume", "--set", "train.base_lr=0.1", "--set", "train.keep_last=3"])
        == 0
    )
    err = capsys.readouterr().err
    changed = [l for l in err.splitlines() if l.startswith("resuming with changed settings:")]
    assert len(changed) == 1, err
    assert "train.base_lr: 0.05 -> 0.1" in changed[0] and "train.keep_last: 2 -> 3" in changed[0]
    assert "train.max_steps: 2 -> 0" in changed[0]
    assert rows(out)[-1]["step"] == 6 and rows(out)[-1]["epoch"] == 0
    before = sorted(os.listdir(out)), open(os.path.join(out, "metrics.jsonl")).read()
    capsys.readouterr()
    assert (
        main(["--config", cfg, "--out", out, "--resume", "--set", "train.base_lr=0.1", "--set", "train.keep_last=3"])
        == 0
    )
    cap = capsys.readouterr()
    assert "is finished (epoch 1 of 1, step 6, best val_acc" in cap.out and "raise train.epochs" in cap.out, cap
    assert (sorted(os.listdir(out)), open(os.path.join(out, "metrics.jsonl")).read()) == before
    # more epochs continue the finished run
    assert (
        main(
            [
                "--config",
                cfg,
                "--out",
                out,
                "--resume",
                "--set",
                "train.epochs=2",
                "--set",
                "train.base_lr=0.1",
                "--set",
                "train.keep_last=3",
            ]
        )
        == 0
    )
    assert rows(out)[-1]["epoch"] == 1 and rows(out)[-1]["step"] == 12


def test_console_metrics_are_rounded_and_jsonl_keeps_full_precision(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["--config", cfg, "--out", out]) == 0
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("epoch 0:")]
    (row,) = rows(out)
    assert f"val_acc {row['val_acc']:.3f}," in line and f"train_loss {row['train_loss']:.4f}," in line, line
    assert repr(row["train_loss"]) not in line  # the full float is in metrics.jsonl only
    assert len(repr(row["train_loss"])) > 8


def test_eval_only_reports_top1_top5_and_per_class_csv_without_touching_the_run(tmp_path, capsys):
    cfg = {**TINY, "data": {**TINY["data"], "num_classes": 7}}
    path = write(tmp_path, cfg)
    out = str(tmp_path / "run")
    assert main(["--config", path, "--out", out]) == 0
    (row,) = rows(out)
    best = os.path.join(out, "checkpoints", "best.pt")

    def tree():
        return sorted((d, f, os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(out) for f in fs)

    before = tree()
    capsys.readouterr()
    ev = str(tmp_path / "eval")
    assert main(["--config", path, "--eval-only", "--checkpoint", best, "--out", ev]) == 0
    printed = capsys.readouterr().out
    assert tree() == before
    assert f"top-1 {row['val_acc']:.3f}" in printed and "top-5 " in printed and "on 20 validation samples" in printed

    # the same figures computed here from the checkpoint's weights
    from dcal.train import config as C
    from dcal.train.build import build_task

    task = build_task(C.from_dict(cfg), seed=cfg["train"]["seed"])
    model = task.model_factory()
    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    model.eval()
    xs = torch.stack([task.val_set[i][0] for i in range(len(task.val_set))])
    ys = torch.tensor([task.val_set[i][1] for i in range(len(task.val_set))])
    with torch.no_grad():
        scores = model(xs)
    top5 = scores.topk(5, dim=1).indices
    want1 = (top5[:, 0] == ys).double().mean().item()
    want5 = (top5 == ys[:, None]).any(1).double().mean().item()
    assert want1 == pytest.approx(row["val_acc"])
    assert f"top-1 {want1:.3f}, top-5 {want5:.3f}" in printed, printed
    table = list(csv.DictReader(open(os.path.join(ev, "per_class_accuracy.csv"))))
    assert [int(r["class"]) for r in table] == list(range(7))
    for r in table:
        c = int(r["class"])
        n = int((ys == c).sum())
        ok = int(((top5[:, 0] == ys) & (ys == c)).sum())
        assert int(r["samples"]) == n and int(r["correct"]) == ok
    assert sum(int(r["correct"]) for r in table) == round(want1 * len(ys))

    # without --out: the CSV lands next to the checkpoint; nothing else in the run changes
    assert main(["--config", path, "--eval-only", "--checkpoint", best]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoints", "best.per_class.csv"))
    assert [t for t in tree() if not t[1].endswith(".per_class.csv")] == before


def test_fine_tune_from_a_previous_run_then_resume_without_the_pretrained_file(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(["--config", cfg, "--out", first, "--set", "train.max_steps=2"]) == 0
    best = str(tmp_path / "start.pt")
    os.rename(os.path.join(first, "checkpoints", "best.pt"), best)
    capsys.readouterr()
    argv = ["--config", cfg, "--out", second, "--set", f"model.pretrained={best}"]
    assert main([*argv, "--set", "train.max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "pretrained: loaded 4 tensors, skipped []" in err, err  # fc1, fc2 weights and biases
    state = torch.load(best, weights_only=True)["model"]
    os.remove(best)  # the resumed run takes its weights from its checkpoint
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "pretrained: not loaded" in err and "error" not in err, err
    assert rows(second)[-1]["step"] == 6
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_config_comparison_refuses_model_and_data_keys_and_lists_the_rest():
    from dcal.train.rundir import compare_configs

    saved = {
        "model": {"name": "dcal_vit", "depth": 3},
        "data": {"name": "synthetic", "num_classes": 10},
        "train": {"epochs": 5, "base_lr": 0.008},
    }
    same = {
        "model": {"name": "dcal_vit", "depth": 3, "drop_path_rate": 0.1, "pretrained": "vit.npz"},
        "data": {"name": "synthetic", "num_classes": 10},
        "train": {"epochs": 10, "base_lr": 0.008},
    }
    refused, changed = compare_configs(saved, same)  # a default written out, a pretrained start: no change
    assert refused == [] and changed == ['model.pretrained: (unset) -> "vit.npz"', "train.epochs: 5 -> 10"]
    other = {
        "model": {"name": "dcal_vit", "depth": 4},
        "data": {"name": "synthetic", "num_classes": 12},
        "train": {"epochs": 5, "base_lr": 0.008, "effective_batch": 32},
    }
    refused, changed = compare_configs(saved, other)
    assert refused == ["data.num_classes: 10 -> 12", "model.depth: 3 -> 4", "train.effective_batch: 16 -> 32"]
    assert changed == []
