"""dcal.nn.fuse_attention reports what it did: the number of converted modules (returned with
``return_count=True``, logged at INFO) and a UserWarning naming the attention classes it left
when it converted none; without ``return_count`` it returns the model as before."""

import logging
import warnings

import pytest
import torch
from torch import nn

from dcal.nn import FusedMultiheadAttention, PWCAAttention, fuse_attention

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _vit(depth):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=3
    )


def test_count_returned_and_logged(caplog):
    model = _vit(depth=3)
    with caplog.at_level(logging.INFO, logger="dcal.nn.convert"), warnings.catch_warnings():
        warnings.simplefilter("error")  # converting something warns about nothing
        got, n = fuse_attention(model, return_count=True)
    assert got is model and n == 3 == sum(isinstance(m, PWCAAttention) for m in model.modules())
    assert "converted 3 attention modules of VisionTransformer" in caplog.text
    # the old calling convention: the model itself
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2, enable_nested_tensor=False
    )
    assert fuse_attention(enc) is enc
    assert sum(isinstance(m, FusedMultiheadAttention) for m in enc.modules()) == 2


def test_a_module_reachable_twice_counts_once():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.ModuleDict({"a": mha, "b": mha})
    _, n = fuse_attention(model, return_count=True)
    assert n == 1 and model["a"] is model["b"] and isinstance(model["a"], FusedMultiheadAttention)
    top, n = fuse_attention(nn.MultiheadAttention(16, 2), return_count=True)  # the model is the module
    assert n == 1 and isinstance(top, FusedMultiheadAttention)


def test_nothing_converted_warns_naming_what_was_left(caplog):
    cnn = torchvision.models.resnet18()
    with (
        caplog.at_level(logging.INFO, logger="dcal.nn.convert"),
        pytest.warns(UserWarning, match="no attention module"),
    ):
        got, n = fuse_attention(cnn, return_count=True)
    assert got is cnn and n == 0 and "converted 0 attention modules of ResNet" in caplog.text
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1))
    before = {k: v.clone() for k, v in swin.state_dict().items()}
    with pytest.warns(UserWarning, match=r"converted no module of SwinTransformer.*WindowAttention x4"):
        assert fuse_attention(swin) is swin
    after = swin.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
