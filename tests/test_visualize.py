"""Pictures: ``python -m dcal.visualize`` on a tiny random checkpoint of the demo model and of the
BEV model, the numbers the pictures are drawn from against the reference ops, and curves.png
after an evaluation."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.train import config as C
from dcal.train.build import build_task

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.train_size=8", "data.val_size=6"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)
    return e


def random_checkpoint(tmp_path, config, overrides=()):
    """A checkpoint in the training loop's format with random weights (no training)."""
    cfg = C.load(os.path.join(ROOT, "configs", config), [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_task(cfg, seed=0).model_factory()
    path = tmp_path / "random.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
    return str(path), model, cfg


@pytest.fixture
def demo_images(tmp_path):
    paths = []
    for i, size in enumerate([(32, 32), (57, 41)]):  # any size: resized like the run's data
        rgb = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rgb).save(p)
        paths.append(str(p))
    return paths


def test_cli_writes_one_png_per_image(tmp_path, demo_images):
    ckpt, _, _ = random_checkpoint(tmp_path, "demo.yaml")
    out = tmp_path / "pics"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcal.visualize",
            "--checkpoint",
            ckpt,
            "--images",
            *demo_images,
            "--val",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr
    written = sorted(os.listdir(out))
    assert written == ["img0.png", "img1.png", "val-2.png"]
    for name in written:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (880, 312), (name, im.size)
            px = np.asarray(im.convert("RGB"))
        assert px.std() > 10  # a picture, not a blank canvas


def test_views_match_reference_rollout_glca_and_probabilities(tmp_path):
    from dcal.ops import reference
    from dcal.visualize import dcal_vit_views

    _, model, cfg = random_checkpoint(tmp_path, "demo.yaml")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    v = dcal_vit_views(model, x)
    c = model.config
    # the reference: dense rollout from the same blocks' queries and keys
    h, qs, ks = model.embed(x), [], []
    with torch.no_grad():
        for blk in model.blocks:
            h, (q, k, _) = blk(h, return_rollout=True)
            qs.append(q)
            ks.append(k)
        want = reference.attention_rollout(qs, ks, scale=model.blocks[0].attn.scale, residual=c.rollout_residual)
        torch.testing.assert_close(v["rollout"].reshape(2, -1), want[:, 1:], atol=1e-5, rtol=1e-4)
        top = want[:, 1:].topk(c.num_local_queries, dim=1).indices
        assert torch.equal(v["local"].sort(1).values, top.sort(1).values)
        torch.testing.assert_close(v["probs"], model(x) / 2)
    assert v["local"].shape == (2, c.num_local_queries) and v["rollout"].shape == (2, c.grid, c.grid)
    torch.testing.assert_close(v["probs"].sum(1), torch.ones(2))


@pytest.mark.parametrize("border", ["zero", "mask", "clamp"])
def test_bev_cell_attention_is_the_ops_softmax(border):
    from dcal.models import BEVGraphModule
    from dcal.ops import neighborhood_attention2d
    from dcal.visualize import bev_cell_attention

    torch.manual_seed(1)
    body = BEVGraphModule(16, num_layers=2, num_heads=2, kernel_size=5, border=border).eval()
    with torch.no_grad():
        for blk in body.blocks:
            blk.attn.rpb.normal_()
    x = torch.randn(16, 9, 11)
    for cell in [(0, 0), (4, 5), (8, 10)]:
        maps = bev_cell_attention(body, x, cell)
        assert maps.shape == (2, 2, 9, 11)
        # weights of the window: the op's output at the cell is their average of v
        attn = body.blocks[0].attn
        with torch.no_grad():
            qkv = attn.qkv(attn.norm(x[None])).view(1, 3, 2, 8, 9, 11)
            q, k, v = (qkv[:, i].permute(0, 1, 3, 4, 2) for i in range(3))
            out = neighborhood_attention2d(q, k, v, kernel_size=5, border=border, rpb=attn.rpb, backend="reference")
        want = out[0, :, cell[0], cell[1]]  # [H, D]
        got = torch.einsum("hxy,hxyd->hd", maps[0], v[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        total = maps[0].sum((-1, -2))
        if border == "zero" and cell != (4, 5):  # windows that reach off the map
            assert (total < 1).all()  # off-map zero keys take part of the softmax
        else:
            torch.testing.assert_close(total, torch.ones(2))
        assert (maps[0].flatten(1) > 0).sum(1).max() <= 25


def test_bev_cli(tmp_path):
    ckpt, _, _ = random_checkpoint(tmp_path, "bev_demo.yaml", ["data.map_size=[12,12]"])
    m = tmp_path / "map.npy"
    np.save(m, np.random.default_rng(0).standard_normal((4, 12, 12)).astype(np.float32))
    from dcal.visualize import main

    assert main(["--checkpoint", ckpt, "--images", str(m), "--cell", "2,7", "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "map-cell2_7.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_refusals_are_one_line(tmp_path, capsys, demo_images):
    from dcal.visualize import main

    ckpt, _, _ = random_checkpoint(tmp_path, "demo.yaml")
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--images", demo_images[0]], "--checkpoint"),
        (["--checkpoint", ckpt, "--images", str(tmp_path / "nope.png")], "--images"),
        (["--checkpoint", ckpt], "--images"),
        (["--checkpoint", ckpt, "--val", "99"], "--val 99"),
        (["--checkpoint", ckpt, "--images", ckpt], "cannot read"),
    ]
    for args, name in cases:
        assert main([*args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and name in err[0], (args, err)
    bev, _, _ = random_checkpoint(tmp_path, "bev_demo.yaml", ["data.map_size=[12,12]"])
    assert main(["--checkpoint", bev, "--val", "0", "--cell", "40,1", "--out", str(tmp_path / "o")]) == 2
    assert "--cell 40,1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- curves.png


def test_curves_png_after_an_evaluation(tmp_path):
    from dcal.train.__main__ import main

    n = torch.get_num_threads()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {name: mlp, hidden: 8}\ndata: {name: synthetic, img_size: 16, num_classes: 3, "
        "train_size: 24, val_size: 6}\ntrain: {epochs: 2, effective_batch: 8, micro_batch: 4, "
        "progress: false, threads: 1}\n"
    )
    try:
        assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    finally:
        torch.set_num_threads(n)
    with Image.open(tmp_path / "o" / "curves.png") as im:
        assert im.size == (900, 585)
    assert not any(p.endswith(".tmp.png") for p in os.listdir(tmp_path / "o"))


def test_curves_without_matplotlib_warn_once(tmp_path, monkeypatch):
    import dcal.train.curves as curves

    (tmp_path / "steps.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "peak_mem_mb": 5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(curves, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert curves.write_curves(str(tmp_path)) is None
        assert curves.write_curves(str(tmp_path)) is None
        assert curves.start(str(tmp_path)) is None  # the training loop's call: no child process
    assert len(caught) == 1 and "matplotlib" in str(caught[0].message)
    assert not (tmp_path / "curves.png").exists()


def test_image_folder_run_uses_its_validation_transform_and_class_names(tmp_path):
    from dcal.train.checkpoint import load
    from dcal.visualize import load_image, load_run, main

    for split in ("train", "val"):
        for c in ("heron", "wren"):
            os.makedirs(tmp_path / "imgs" / split / c)
            rgb = np.random.default_rng(len(c)).integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "imgs" / split / c / "0.jpg")
    cfg = C.from_dict(
        {
            "model": {"name": "dcal_vit", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "data": {"name": "folder", "root": str(tmp_path / "imgs"), "resize": 36, "crop": 32},
            "train": {},
        }
    )
    model = build_task(cfg).model_factory()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, tmp_path / "c.pt")
    _, run_cfg, val, classes = load_run(str(tmp_path / "c.pt"))
    assert classes == ["heron", "wren"] and load(str(tmp_path / "c.pt"))["step"] == 0
    img = str(tmp_path / "imgs" / "val" / "wren" / "0.jpg")
    torch.testing.assert_close(load_image(img, run_cfg), val[1][0])  # the same pixels as validation sees
    assert main(["--checkpoint", str(tmp_path / "c.pt"), "--images", img, "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "0.png") as im:
        assert im.size == (880, 312)
