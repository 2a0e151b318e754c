"""DCALViT loads timm ViT checkpoints (state dict, .safetensors; any image size) and is in timm's
registry. Random timm models saved to tmp_path: nothing is downloaded."""

import pytest
import torch

from dcal.models import DCALConfig, DCALViT
from dcal.models.vit_npz import _resample_pos_embed, resample_pos_embed

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4)


def _timm_vit(img_size, num_classes=10, **kw):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=img_size, num_classes=num_classes, qkv_bias=True, **{**SMALL, **kw})
    with torch.no_grad():  # non-trivial norms and biases
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _dcal(img_size, num_classes=10, ablation="sa"):
    return DCALViT(DCALConfig(img_size=img_size, num_classes=num_classes, ablation=ablation, **SMALL)).eval()


@pytest.mark.parametrize("as_file", [True, False], ids=["safetensors", "state_dict"])
def test_same_size_checkpoint_gives_timm_predictions(tmp_path, as_file):
    theirs = _timm_vit(48).double()
    src = theirs.state_dict()
    if as_file:
        src = tmp_path / "vit.safetensors"
        safetensors_torch.save_file(theirs.state_dict(), str(src))
    ours = _dcal(48).double()
    report = ours.load_timm(src)
    assert report["skipped"] == [] and "head.weight" in report["loaded"]
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).softmax(-1), atol=1e-12, rtol=1e-12)


def test_other_size_resamples_with_timm_and_fills_glca(tmp_path):
    theirs = _timm_vit(32, num_classes=1000)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file(theirs.state_dict(), str(path))
    ours = _dcal(64, num_classes=200, ablation="full")
    report = ours.load_pretrained(path)
    assert report["skipped"] == ["head.bias", "head.weight"]  # 1000 classes do not fit 200
    want = timm.layers.resample_abs_pos_embed(theirs.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert ours.pos_embed.shape == (1, 17, 64) and torch.equal(ours.pos_embed.detach(), want)
    assert torch.equal(ours.blocks[1].attn.qkv.weight, theirs.blocks[1].attn.qkv.weight)
    assert torch.equal(ours.glca_block.mlp.fc2.weight, theirs.blocks[1].mlp.fc2.weight)
    assert torch.equal(ours.glca_norm.bias, theirs.norm.bias)
    with pytest.raises(ValueError, match="load_head=True"):
        ours.load_timm(path, load_head=True)


def test_fallback_resize_equals_timms():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    torch.testing.assert_close(_resample_pos_embed(pos, 28), resample_pos_embed(pos, 28), atol=1e-6, rtol=1e-6)


def test_training_checkpoint_wrapper_and_ddp_prefix():
    theirs = _timm_vit(48)
    ours = _dcal(48)
    ours.load_timm({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}})
    assert torch.equal(ours.patch_embed.proj.weight, theirs.patch_embed.proj.weight)


BAD = [
    ("layer_scale", lambda: _timm_vit(48, init_values=1e-5).state_dict(), r"cannot take: \['blocks.0.ls1.gamma'"),
    ("deeper", lambda: _timm_vit(48, depth=3).state_dict(), "blocks.2"),
    (
        "missing",
        lambda: {k: v for k, v in _timm_vit(48).state_dict().items() if k != "norm.weight"},
        "misses.*norm.weight",
    ),
    ("width", lambda: _timm_vit(48, embed_dim=32, num_heads=2).state_dict(), "pos_embed|shape"),
]


@pytest.mark.parametrize("make,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_incompatible_checkpoint_raises_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        _dcal(48).load_timm(make())


# ----------------------------------------------------------------------------- registry


def test_create_model_dcal_vit_base_448():
    model = timm.create_model("dcal_vit_base_patch16_448", num_classes=200, device="meta")
    c = model.config
    assert isinstance(model, DCALViT)
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.num_classes) == (448, 16, 768, 12, 12, 200)
    assert model.pretrained_cfg["input_size"] == (3, 448, 448)
    assert "dcal_vit_base_patch16_448" in timm.list_models("dcal_*")


def test_create_model_pretrained_from_local_file(tmp_path):
    theirs = _timm_vit(32)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file(theirs.state_dict(), str(path))
    model = timm.create_model(
        "dcal_vit_base_patch16_448",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=10,
        img_size=32,
        **SMALL,
    )
    assert torch.equal(model.head.weight, theirs.head.weight)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pretrained=True), "nothing is downloaded"),
        (dict(global_pool="avg"), "global_pool"),
        (dict(drop_rate=0.1), "drop_rate"),
        (dict(class_token=False), r"unknown arguments \['class_token'\]"),
    ],
    ids=["pretrained_without_file", "avg_pool", "drop_rate", "unknown"],
)
def test_create_model_refusals(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        timm.create_model("dcal_vit_base_patch16_448", device="meta", **kwargs)
