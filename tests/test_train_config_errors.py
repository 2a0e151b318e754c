"""Every config and command-line mistake stops ``python -m dcal.train`` before any work: exit
status 2, one line on stderr starting with ``error:`` that names the key, no traceback, nothing
written into ``--out`` (a folder that did not exist is not created; one that held a run is left as
it was). Most rows call the CLI's ``main`` in-process; a few run the real command line."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from dcal.train.__main__ import main
from train_configs import TINY_MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MLP = TINY_MLP
VIT = {
    "model": {
        "name": "dcal_vit",
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.0,
    },
    "data": {"name": "synthetic", "img_size": 16, "num_classes": 4, "train_size": 44, "val_size": 20},
    "train": MLP["train"],
}
TIMM = {
    "model": {
        "name": "timm",
        "timm_name": "vit_tiny_patch16_224",
        "patch_size": 4,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
    },
    "data": VIT["data"],
    "train": MLP["train"],
}


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def timm_file(tmp_path, embed_dim=16):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=embed_dim, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=4
    )
    p = tmp_path / f"vit{embed_dim}.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
    return str(p)


def junk(tmp_path, name, data=b"\x00not a checkpoint\xff" * 7):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def hf_folder(tmp_path, model_type="vit", config=True):
    d = tmp_path / f"hf_{model_type}_{config}"
    d.mkdir()
    if config:
        (d / "config.json").write_text('{"model_type": "%s", "hidden_act": "gelu"}' % model_type)
    from safetensors.torch import save_file

    save_file({"embeddings.cls_token": torch.zeros(1, 1, 16)}, str(d / "model.safetensors"))
    return str(d)


def image_folder(tmp_path, val_classes=("a", "b")):
    from PIL import Image

    root = tmp_path / "imgs"
    for split, classes in (("train", ("a", "b", "c")), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(root / split / c / f"{i}.png")
    return str(root)


# (id, base config, extra CLI args (a callable of tmp_path for files), words the one line must hold)
ROWS = [
    ("unknown_train_key", MLP, ["--set", "train.epochz=2"], ["train.epochz"]),
    ("bad_amp", MLP, ["--set", "train.amp=fp8"], ["train.amp"]),
    ("unknown_model_key", MLP, ["--set", "model.hiden=3"], ["model.hiden"]),
    ("unknown_data_key", MLP, ["--set", "data.img_sise=3"], ["data.img_sise"]),
    (
        "unknown_model_name",
        MLP,
        ["--set", "model.name=resnet"],
        ["model.name", "dcal_vit", "timm", "open_clip", "protonet", "clip", "bev", "mlp"],
    ),
    ("memory_word", MLP, ["--max-memory", "sixteen"], ["--max-memory"]),
    ("img_size_mismatch", VIT, ["--set", "data.img_size=48"], ["model.img_size", "16", "48"]),
    ("classes_fewer_than_data", VIT, ["--set", "model.num_classes=3"], ["model.num_classes", "3", "4"]),
    ("classes_more_than_data", MLP, ["--set", "model.num_classes=9"], ["model.num_classes"]),
    ("micro_above_effective", MLP, ["--set", "train.micro_batch=16"], ["train.micro_batch", "train.effective_batch"]),
    ("micro_zero", MLP, ["--micro-batch", "0"], ["train.micro_batch"]),
    ("epochs_zero", MLP, ["--set", "train.epochs=0"], ["train.epochs"]),
    ("effective_negative", MLP, ["--set", "train.effective_batch=-1"], ["train.effective_batch"]),
    (
        "effective_above_dataset",
        MLP,
        ["--set", "train.effective_batch=64", "--set", "train.micro_batch=8"],
        ["train.effective_batch", "44"],
    ),
    ("warmup_longer_than_run", MLP, ["--set", "train.warmup_epochs=3"], ["train.warmup_epochs", "train.epochs"]),
    ("min_lr_above_peak", MLP, ["--set", "train.min_lr=0.5"], ["train.min_lr"]),
    ("betas_one", MLP, ["--set", "train.betas=[0.9]"], ["train.betas"]),
    ("device_cuda_without_gpu", MLP, ["--set", "train.device=cuda"], ["train.device"]),
    ("data_classes_word", MLP, ["--set", "data.num_classes=ten"], ["data.num_classes"]),
    ("data_classes_one", MLP, ["--set", "data.num_classes=1"], ["data.num_classes"]),
    ("patch_not_dividing", VIT, ["--set", "model.patch_size=5"], ["model.img_size", "patch_size"]),
    ("heads_not_dividing", VIT, ["--set", "model.num_heads=3"], ["model.embed_dim", "num_heads"]),
    ("bad_ablation", VIT, ["--set", "model.ablation=none"], ["model.ablation"]),
    ("depth_word", VIT, ["--set", "model.depth=abc"], ["model.depth"]),
    ("glca_ratio_zero", VIT, ["--set", "model.glca_ratio=0"], ["model.glca_ratio"]),
    ("key_of_another_model", MLP, ["--set", "model.name=bev"], ["model.hidden"]),
    ("bev_model_on_images", {**MLP, "model": {"name": "bev"}}, [], ["model.name", "bev_synthetic"]),
    ("clip_on_images", {**MLP, "model": {"name": "clip"}}, [], ["model.name", "synthetic_captions"]),
    ("cub_without_root", {**MLP, "data": {"name": "cub"}}, [], ["data.root"]),
    ("cub_root_missing", {**MLP, "data": {"name": "cub", "root": "/nonexistent/CUB_200_2011"}}, [], ["data.root"]),
    # a validation folder may lack a training class (labels follow the training folder), but a class
    # the training folder does not have cannot be scored
    (
        "val_class_not_in_train",
        {**MLP, "data": {"name": "imagefolder", "resize": 18, "crop": 16}},
        lambda t: ["--set", f"data.root={image_folder(t, val_classes=('a', 'd'))}", "--set", "train.effective_batch=4"],
        ["data.root", "'d'"],
    ),
    (
        "pretrained_missing",
        VIT,
        ["--set", "model.pretrained=/nonexistent/ViT-B_16.npz"],
        ["model.pretrained", "does not exist"],
    ),
    (
        "pretrained_unknown_kind",
        VIT,
        lambda t: ["--set", f"model.pretrained={junk(t, 'w.txt')}"],
        ["model.pretrained", "unknown kind"],
    ),
    (
        "pretrained_unreadable_safetensors",
        VIT,
        lambda t: ["--set", f"model.pretrained={junk(t, 'w.safetensors')}"],
        ["model.pretrained", "cannot be read"],
    ),
    (
        "pretrained_unreadable_pth",
        VIT,
        lambda t: ["--set", f"model.pretrained={junk(t, 'w.pth')}"],
        ["model.pretrained", "cannot be read"],
    ),
    (
        "pretrained_unreadable_npz",
        VIT,
        lambda t: ["--set", f"model.pretrained={junk(t, 'w.npz')}"],
        ["model.pretrained", "cannot be read"],
    ),
    (
        "pretrained_wrong_width",
        VIT,
        lambda t: ["--set", f"model.pretrained={timm_file(t, 32)}"],
        ["model.pretrained", "model.embed_dim", "32", "16"],
    ),
    (
        "pretrained_wrong_depth",
        VIT,
        lambda t: ["--set", f"model.pretrained={timm_file(t)}", "--set", "model.depth=2"],
        ["model.pretrained", "model.depth"],
    ),
    (
        "pretrained_wrong_patch",
        VIT,
        lambda t: ["--set", f"model.pretrained={timm_file(t)}", "--set", "model.patch_size=8"],
        ["model.pretrained", "model.patch_size"],
    ),
    (
        "pretrained_folder_without_config",
        VIT,
        lambda t: ["--set", f"model.pretrained={hf_folder(t, config=False)}"],
        ["model.pretrained", "config.json"],
    ),
    (
        "pretrained_folder_not_vit",
        VIT,
        lambda t: ["--set", f"model.pretrained={hf_folder(t, 'bert')}"],
        ["model.pretrained", "model_type"],
    ),
    (
        "pretrained_for_mlp_of_a_vit",
        MLP,
        lambda t: ["--set", f"model.pretrained={timm_file(t)}"],
        ["model.pretrained", "is not in the model"],
    ),
    ("timm_without_name", {**TIMM, "model": {"name": "timm"}}, [], ["model.timm_name"]),
    (
        "timm_unknown_name",
        TIMM,
        ["--set", "model.timm_name=vit_tiny_patch16_2244"],
        ["model.timm_name", "vit_tiny_patch16_224"],
    ),
    (
        "timm_not_a_vit",
        TIMM,
        [
            "--set",
            "model.timm_name=resnet18",
            "--set",
            "model.patch_size=null",
            "--set",
            "model.embed_dim=null",
            "--set",
            "model.depth=null",
            "--set",
            "model.num_heads=null",
        ],
        ["model.timm_name", "not a ViT"],
    ),
    ("timm_unknown_key", TIMM, ["--set", "model.foo=1"], ["model.foo"]),
    ("timm_img_size_mismatch", TIMM, ["--set", "model.img_size=32"], ["model.img_size"]),
    ("missing_config_file", None, [], ["config file", "--config"]),
    ("config_not_yaml", "key: [unclosed\n", [], ["not valid YAML", "line"]),
    ("config_not_mapping", "- a\n- b\n", [], ["config", "mapping"]),
    ("unknown_section", {**MLP, "optim": {"lr": 1}}, [], ["optim"]),
    ("no_model_name", {**MLP, "model": {"hidden": 3}}, [], ["model.name"]),
    ("set_without_equals", MLP, ["--set", "train.epochs"], ["--set"]),
    ("set_bad_section", MLP, ["--set", "optimizer.lr=3"], ["--set", "optimizer.lr"]),
    ("eval_only_without_checkpoint", MLP, ["--eval-only"], ["--checkpoint"]),
    ("eval_only_missing_checkpoint", MLP, ["--eval-only", "--checkpoint", "/nonexistent/best.pt"], ["--checkpoint"]),
    ("checkpoint_without_eval_only", MLP, ["--checkpoint", "x.pt"], ["--checkpoint", "--resume"]),
    ("resume_and_overwrite", MLP, ["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    ("resume_without_checkpoint", MLP, ["--resume"], ["--resume", "no checkpoint"]),
    ("unknown_flag", MLP, ["--epochs", "3"], ["--epochs"]),
]


def _argv(tmp_path, base, extra, out):
    if base is None:
        cfg = str(tmp_path / "missing.yaml")
    elif isinstance(base, str):
        cfg = str(tmp_path / "c.yaml")
        (tmp_path / "c.yaml").write_text(base)
    else:
        cfg = write(tmp_path, base)
    extra = extra(tmp_path) if callable(extra) else extra
    return ["--config", cfg, "--out", out, *extra]


def _one_error_line(err, words):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("base, extra, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_mistake_is_one_line_before_any_work(tmp_path, capsys, base, extra, words):
    out = str(tmp_path / "out")
    argv = _argv(tmp_path, base, extra, out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    _one_error_line(capsys.readouterr().err, words)
    assert not os.path.exists(out)


def snapshot(folder):
    return sorted(
        (
            os.path.relpath(os.path.join(d, f), folder),
            os.path.getsize(os.path.join(d, f)),
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, fs in os.walk(folder)
        for f in fs
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = write(tmp, MLP)
    out = str(tmp / "out")
    assert main(["--config", cfg, "--out", out, "--set", "train.max_steps=2", "--set", "train.epochs=2"]) == 0
    return cfg, out


RUN_ROWS = [
    ("out_holds_a_run", [], ["--out", "metrics.jsonl", "--resume", "--overwrite", ".old-"]),
    ("resume_changes_the_model", ["--resume", "--set", "model.hidden=8"], ["model.hidden", "16", "8"]),
    ("resume_changes_the_data", ["--resume", "--set", "data.num_classes=5"], ["data.num_classes", "4", "5"]),
    (
        "resume_changes_the_batch",
        ["--resume", "--set", "train.effective_batch=4", "--set", "train.micro_batch=2"],
        ["train.effective_batch", "8", "4"],
    ),
    ("resume_bad_path", ["--resume", "/nonexistent/step-1.pt"], ["--resume", "does not exist"]),
    ("resume_from_another_run", ["--resume", "OTHER"], ["--resume", "not a checkpoint of the run in --out"]),
    (
        "eval_checkpoint_of_other_model",
        ["--eval-only", "--checkpoint", "BEST", "--set", "model.hidden=8"],
        ["--checkpoint", "model.hidden"],
    ),
]


@pytest.mark.parametrize("extra, words", [r[1:] for r in RUN_ROWS], ids=[r[0] for r in RUN_ROWS])
def test_mistake_about_an_existing_run_leaves_it_as_it_was(finished_run, capsys, extra, words):
    cfg, out = finished_run
    before = snapshot(out)
    other = os.path.join(os.path.dirname(out), "elsewhere.pt")
    if "OTHER" in extra and not os.path.exists(other):
        shutil.copyfile(os.path.join(out, "checkpoints", "best.pt"), other)
    extra = [
        os.path.join(out, "checkpoints", "best.pt") if a == "BEST" else other if a == "OTHER" else a for a in extra
    ]
    capsys.readouterr()
    assert main(["--config", cfg, "--out", out, "--set", "train.max_steps=2", "--set", "train.epochs=2", *extra]) == 2
    _one_error_line(capsys.readouterr().err, words)
    assert snapshot(out) == before
    assert not any(n.startswith("out.old-") for n in os.listdir(os.path.dirname(out)))


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)
    return e


@pytest.mark.parametrize("row", ["img_size_mismatch", "pretrained_wrong_width", "unknown_flag"])
def test_real_command_line(tmp_path, row):
    base, extra, words = next(r[1:] for r in ROWS if r[0] == row)
    out = str(tmp_path / "out")
    r = subprocess.run(
        [sys.executable, "-m", "dcal.train", *_argv(tmp_path, base, extra, out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    _one_error_line(r.stderr, words)
    assert not os.path.exists(out)
