"""model.pretrained: random timm ViTs, Hugging Face ViTs and JAX-layout .npz files saved to tmp_path
(nothing is downloaded) load through the CLI's builders; in fp64 the loaded model's forward equals
the source model's where the architectures coincide."""

import os

import numpy as np
import pytest
import torch
import yaml

from dcal.train import config as C
from dcal.train.build import build_task
from dcal.train.pretrained import PretrainedError, load_pretrained

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_vit(img_size=32, num_classes=10, mlp_ratio=2.0, seed=0):
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=img_size, num_classes=num_classes, qkv_bias=True, mlp_ratio=mlp_ratio, **ARCH)
    with torch.no_grad():  # non-trivial norms, biases and position embeddings
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def cfg_for(model, img_size=32, num_classes=10, **extra):
    data = {"name": "synthetic", "img_size": img_size, "num_classes": num_classes, "train_size": 16, "val_size": 8}
    train = {"epochs": 1, "effective_batch": 8, "micro_batch": 8, "progress": False, "threads": 1}
    return C.from_dict({"model": {**model, **extra}, "data": data, "train": train})


def dcal_cfg(path, img_size=32, num_classes=10, ablation="sa", mlp_ratio=2.0, **kw):
    return cfg_for(
        {
            "name": "dcal_vit",
            "ablation": ablation,
            "mlp_ratio": mlp_ratio,
            "drop_path_rate": 0.0,
            "pretrained": str(path),
            **ARCH,
            **kw,
        },
        img_size,
        num_classes,
    )


def timm_cfg(path, img_size=32, num_classes=10, **kw):
    return cfg_for(
        {"name": "timm", "timm_name": "vit_tiny_patch16_224", "mlp_ratio": 2.0, "pretrained": str(path), **ARCH, **kw},
        img_size,
        num_classes,
    )


def build(cfg):
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.model_factory()
    report = load_pretrained(model, task.pretrained)
    return model.eval(), report


def x_of(img_size=32, n=3):
    return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def save_timm(m, tmp_path, kind):
    if kind == "safetensors":
        path = tmp_path / "vit.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    else:
        path = tmp_path / "vit.pth"
        torch.save({"model": m.state_dict(), "epoch": 3}, str(path))  # a training checkpoint wraps it
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_timm_checkpoint_into_dcal_vit_equals_timm_forward(tmp_path, kind):
    src = timm_vit()
    path = save_timm(src, tmp_path, kind)
    model, report = build(dcal_cfg(path))
    assert report.startswith("pretrained: loaded ") and report.endswith("(head: 10 classes, loaded)"), report
    x = x_of()
    with torch.no_grad():
        want = src.double()(x).softmax(-1)
        got = model.double()(x)  # eval, ablation "sa": softmax of the SA head
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_other_image_size_and_classes_resize_and_reinitialise_the_head(tmp_path):
    src = timm_vit(img_size=32, num_classes=7)
    path = save_timm(src, tmp_path, "safetensors")
    model, report = build(dcal_cfg(path, img_size=48, num_classes=10, ablation="full"))
    assert "skipped [head.bias, head.weight]" in report and report.endswith("(head: 10 classes, reinitialised)")
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    sd = model.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith("blocks.1."):
            assert torch.equal(sd["glca_block." + k[len("blocks.1.") :]], v), k  # GLCA starts as the last block
        if not k.startswith(("head.", "pos_embed")):
            assert torch.equal(sd[k], v), k


def test_model_name_timm_with_fused_attention_equals_timm(tmp_path):
    from dcal.nn import PWCAAttention

    src = timm_vit()
    path = save_timm(src, tmp_path, "safetensors")
    model, report = build(timm_cfg(path))
    assert any(isinstance(m, PWCAAttention) for m in model.modules())
    assert report.endswith("(head: 10 classes, loaded)"), report
    x = x_of()
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), src.double()(x), rtol=1e-10, atol=1e-12)


def hf_vit(tmp_path, num_labels=10, eps=1e-6, classifier=True, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        layer_norm_eps=eps,
        qkv_bias=True,
    )
    torch.manual_seed(seed)
    cls = transformers.ViTForImageClassification if classifier else transformers.ViTModel
    m = cls(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "hf"
    m.save_pretrained(str(folder))
    return m.eval(), folder


@pytest.mark.parametrize("name", ["dcal_vit", "timm"])
def test_hugging_face_vit_folder_equals_hf_forward(tmp_path, name):
    src, folder = hf_vit(tmp_path)
    model, report = build(dcal_cfg(folder) if name == "dcal_vit" else timm_cfg(folder))
    assert report.endswith("(head: 10 classes, loaded)") and "note" not in report, report
    x = x_of()
    with torch.no_grad():
        logits = src.double()(pixel_values=x).logits
        got = model.double()(x)
    torch.testing.assert_close(got, logits.softmax(-1) if name == "dcal_vit" else logits, rtol=1e-10, atol=1e-12)


def test_hugging_face_vit_model_without_classifier_and_other_eps(tmp_path):
    src, folder = hf_vit(tmp_path, eps=1e-12, classifier=False)
    model, report = build(dcal_cfg(folder, img_size=48))
    assert "pooler.dense.bias" in report and "reinitialised" in report, report
    assert "layer_norm_eps 1e-12" in report  # told, not hidden
    sd, hf = model.state_dict(), safetensors_torch.load_file(str(folder / "model.safetensors"))
    a = "encoder.layer.0.attention.attention."
    assert torch.equal(
        sd["blocks.0.attn.qkv.weight"],
        torch.cat([hf[a + "query.weight"], hf[a + "key.weight"], hf[a + "value.weight"]]),
    )
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], hf["encoder.layer.1.output.dense.weight"])


def timm_to_npz(m, path, pre_logits=True):
    """The JAX release's layout written from a timm ViT (the inverse of the loader's mapping)."""
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    C = sd["cls_token"].shape[-1]
    H = m.blocks[0].attn.num_heads
    D = C // H
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if pre_logits:
        w["pre_logits/kernel"], w["pre_logits/bias"] = np.zeros((C, C), np.float32), np.zeros(C, np.float32)
    for i in range(len(m.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = p + "MultiHeadDotProductAttention_1/"
        qw, kw, vw = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        for n, wt, bs in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            w[f"{a}{n}/kernel"] = wt.T.reshape(C, H, D)
            w[f"{a}{n}/bias"] = bs.reshape(H, D)
        w[a + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(H, D, C)
        w[a + "out/bias"] = sd[b + "attn.proj.bias"]
        for src_name, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            w[f"{p}{dst}/scale"], w[f"{p}{dst}/bias"] = sd[f"{b}{src_name}.weight"], sd[f"{b}{src_name}.bias"]
        w[p + "MlpBlock_3/Dense_0/kernel"], w[p + "MlpBlock_3/Dense_0/bias"] = (
            sd[b + "mlp.fc1.weight"].T,
            sd[b + "mlp.fc1.bias"],
        )
        w[p + "MlpBlock_3/Dense_1/kernel"], w[p + "MlpBlock_3/Dense_1/bias"] = (
            sd[b + "mlp.fc2.weight"].T,
            sd[b + "mlp.fc2.bias"],
        )
    np.savez(path, **w)
    return path


@pytest.mark.parametrize("name", ["dcal_vit", "timm"])
def test_jax_npz_equals_timm_forward(tmp_path, name):
    src = timm_vit()
    path = timm_to_npz(src, str(tmp_path / "ViT-T.npz"))
    model, report = build(dcal_cfg(path) if name == "dcal_vit" else timm_cfg(path))
    assert "skipped [pre_logits/bias, pre_logits/kernel]" in report and report.endswith("loaded)"), report
    x = x_of()
    with torch.no_grad():
        want = src.double()(x)
        got = model.double()(x)
    torch.testing.assert_close(got, want.softmax(-1) if name == "dcal_vit" else want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "key, value, word",
    [
        ("embed_dim", 64, "model.embed_dim"),
        ("depth", 3, "model.depth"),
        ("patch_size", 4, "model.patch_size"),
        ("num_heads", 4, "model.num_heads"),
        ("mlp_ratio", 4.0, "model.mlp_ratio"),
    ],
)
@pytest.mark.parametrize("fmt", ["safetensors", "hf", "npz"])
def test_wrong_architecture_is_one_line_naming_the_key_and_leaves_the_model(tmp_path, key, value, word, fmt):
    if fmt == "hf":
        _, path = hf_vit(tmp_path)
    elif fmt == "npz":
        path = timm_to_npz(timm_vit(), str(tmp_path / "v.npz"))
    else:
        path = save_timm(timm_vit(), tmp_path, "safetensors")
    if key == "num_heads" and fmt == "safetensors":
        pytest.skip("a timm state dict does not record the head count (qkv is one matrix)")
    kw = {**ARCH, key: value}
    task = build_task(
        cfg_for(
            {
                "name": "dcal_vit",
                "ablation": "sa",
                "mlp_ratio": 2.0,
                "pretrained": str(path),
                **{k: v for k, v in kw.items() if k != "mlp_ratio"},
                **({"mlp_ratio": value} if key == "mlp_ratio" else {}),
            }
        )
    )
    model = task.model_factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError) as e:
        load_pretrained(model, task.pretrained)
    msg = str(e.value)
    assert msg.startswith("model.pretrained:") and word in msg and "\n" not in msg, msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_prints_the_report_and_trains(tmp_path, capsys):
    from dcal.train.__main__ import main

    path = save_timm(timm_vit(img_size=32, num_classes=4), tmp_path, "safetensors")
    cfg = {
        "model": {
            "name": "dcal_vit",
            "ablation": "full",
            "mlp_ratio": 2.0,
            "drop_path_rate": 0.0,
            "pretrained": str(path),
            **ARCH,
        },
        "data": {"name": "synthetic", "img_size": 32, "num_classes": 10, "train_size": 16, "val_size": 8},
        "train": {"epochs": 1, "effective_batch": 8, "micro_batch": 8, "progress": False, "threads": 1},
    }
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "run")
    assert main(["--config", str(c), "--out", out, "--set", "train.max_steps=1"]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("pretrained:")]
    assert len(lines) == 1 and lines[0].endswith("(head: 10 classes, reinitialised)"), err
    assert "skipped [head.bias, head.weight]" in lines[0]
    assert os.path.isfile(os.path.join(out, "metrics.jsonl"))


def test_dcal_vit_load_pretrained_reads_a_hugging_face_folder(tmp_path):
    from dcal.models import DCALConfig, DCALViT

    src, folder = hf_vit(tmp_path)
    model = DCALViT(
        DCALConfig(img_size=32, num_classes=10, ablation="sa", mlp_ratio=2.0, drop_path_rate=0.0, **ARCH)
    ).eval()
    report = model.load_pretrained(str(folder))
    assert report["skipped"] == [] and "head.weight" in report["loaded"]
    x = x_of()
    with torch.no_grad():
        torch.testing.assert_close(
            model.double()(x), src.double()(pixel_values=x).logits.softmax(-1), rtol=1e-10, atol=1e-12
        )
