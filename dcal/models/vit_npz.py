"""Loading of the original JAX ViT release (``ViT-B_16.npz``) into a :class:`DCALViT`, numpy only.

Layout of the release (C width, H heads, D = C / H, F the MLP width)::

    embedding/kernel [p, p, 3, C] (HWIO), embedding/bias [C], cls [1, 1, C]
    Transformer/posembed_input/pos_embedding [1, 1 + g*g, C]     (g = 14 for 224 px)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}        -> blocks.i.norm1
        .../MultiHeadDotProductAttention_1/{query,key,value}/kernel [C, H, D], bias [H, D]  -> attn.qkv
        .../MultiHeadDotProductAttention_1/out/kernel [H, D, C], bias [C]                   -> attn.proj
        .../LayerNorm_2/{scale, bias}                             -> blocks.i.norm2
        .../MlpBlock_3/Dense_0/kernel [C, F], bias [F]            -> blocks.i.mlp.fc1
        .../MlpBlock_3/Dense_1/kernel [F, C], bias [C]            -> blocks.i.mlp.fc2
    Transformer/encoder_norm/{scale, bias}                        -> norm (and glca_norm)
    head/...                                                      skipped: the classes differ

The position grid g x g is resized to the model's grid with bicubic interpolation
(``align_corners=False, antialias=True``, as timm's ``resample_abs_pos_embed``); the CLS entry is
kept. The GLCA block (own weights) starts as a copy of the last SA block.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + grid*grid, C]: bicubic resize of the patch grid, CLS kept.

    Uses timm's own ``timm.layers.resample_abs_pos_embed`` when timm is installed, so checkpoints
    resized here match timm's; otherwise the same resize written out (bicubic,
    ``align_corners=False, antialias=True``, in fp32).
    """
    n = pos.shape[1] - 1
    g = math.isqrt(n)
    if g == grid:
        return pos
    try:
        from timm.layers import resample_abs_pos_embed
    except ImportError:
        return _resample_pos_embed(pos, grid)
    return resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[g, g], num_prefix_tokens=1)


def _resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    g = math.isqrt(pos.shape[1] - 1)
    cls, patches = pos[:, :1], pos[:, 1:]
    img = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [1, C, g, g]
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=1)


def load_vit_npz(model, path: str) -> None:
    """Copy the JAX ViT weights at ``path`` into ``model`` (a :class:`DCALViT`), in place.

    Raises ValueError naming the key when one is missing or has the wrong shape.
    """
    c = model.config
    C, H, p = c.embed_dim, c.num_heads, c.patch_size
    D = C // H
    if model.blocks[0].attn.qkv.bias is None:
        raise ValueError("the JAX checkpoint has query/key/value biases; build the model with qkv_bias=True")
    with np.load(path, allow_pickle=False) as w:

        def get(key, shape):
            if key not in w.files:
                raise ValueError(f"{path}: key {key!r} is missing (expected shape {shape})")
            a = w[key]
            if tuple(a.shape) != tuple(shape):
                raise ValueError(
                    f"{path}: key {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                    f"for embed_dim={C}, num_heads={H}, patch_size={p}"
                )
            return torch.from_numpy(np.ascontiguousarray(a))

        sd = {
            "patch_embed.proj.weight": get("embedding/kernel", (p, p, c.in_chans, C)).permute(3, 2, 0, 1),
            "patch_embed.proj.bias": get("embedding/bias", (C,)),
            "cls_token": get("cls", (1, 1, C)),
            "norm.weight": get("Transformer/encoder_norm/scale", (C,)),
            "norm.bias": get("Transformer/encoder_norm/bias", (C,)),
        }
        key = "Transformer/posembed_input/pos_embedding"
        if key not in w.files:
            raise ValueError(f"{path}: key {key!r} is missing (expected shape [1, 1 + g*g, {C}])")
        n = w[key].shape[1] - 1 if w[key].ndim == 3 else -1
        if n < 1 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"{path}: key {key!r} has shape {w[key].shape}, expected [1, 1 + g*g, {C}]")
        sd["pos_embed"] = resample_pos_embed(get(key, (1, n + 1, C)), c.grid)
        hidden = int(C * c.mlp_ratio)
        for i in range(c.depth):
            pre, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
            att = pre + "MultiHeadDotProductAttention_1/"
            # JAX kernels are [in, out]; torch Linear weights are [out, in].
            qkv_w = [get(f"{att}{n}/kernel", (C, H, D)).reshape(C, C).t() for n in ("query", "key", "value")]
            qkv_b = [get(f"{att}{n}/bias", (H, D)).reshape(C) for n in ("query", "key", "value")]
            sd.update(
                {
                    dst + "norm1.weight": get(pre + "LayerNorm_0/scale", (C,)),
                    dst + "norm1.bias": get(pre + "LayerNorm_0/bias", (C,)),
                    dst + "attn.qkv.weight": torch.cat(qkv_w, 0),
                    dst + "attn.qkv.bias": torch.cat(qkv_b, 0),
                    dst + "attn.proj.weight": get(att + "out/kernel", (H, D, C)).reshape(C, C).t(),
                    dst + "attn.proj.bias": get(att + "out/bias", (C,)),
                    dst + "norm2.weight": get(pre + "LayerNorm_2/scale", (C,)),
                    dst + "norm2.bias": get(pre + "LayerNorm_2/bias", (C,)),
                    dst + "mlp.fc1.weight": get(pre + "MlpBlock_3/Dense_0/kernel", (C, hidden)).t(),
                    dst + "mlp.fc1.bias": get(pre + "MlpBlock_3/Dense_0/bias", (hidden,)),
                    dst + "mlp.fc2.weight": get(pre + "MlpBlock_3/Dense_1/kernel", (hidden, C)).t(),
                    dst + "mlp.fc2.bias": get(pre + "MlpBlock_3/Dense_1/bias", (C,)),
                }
            )
    if hasattr(model, "glca_block"):
        last = f"blocks.{c.depth - 1}."
        sd.update({"glca_block." + k[len(last) :]: v for k, v in sd.items() if k.startswith(last)})
        sd["glca_norm.weight"], sd["glca_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value.to(params[name].dtype))


def npz_to_timm(w) -> tuple:
    """The arrays of a JAX ViT release (a mapping name -> tensor, as in the ``.npz``) in timm's
    parameter names, whatever the size of the model: returns ``(state dict, skipped keys,
    num_heads)``. ``pre_logits`` (the ImageNet-21k representation layer, unused by a fine-tuned
    model) is skipped. The head is ``head.weight`` [classes, C] / ``head.bias``.
    Raises ValueError naming the key when one is missing or of an unexpected rank."""

    def get(key, ndim):
        if key not in w:
            raise ValueError(f"key {key!r} is missing (not a JAX ViT release)")
        a = w[key]
        if a.dim() != ndim:
            raise ValueError(f"key {key!r} has shape {tuple(a.shape)}, expected {ndim} dimensions")
        return a

    kernel = get("embedding/kernel", 4)  # [p, p, in, C]
    C = kernel.shape[3]
    sd = {
        "patch_embed.proj.weight": kernel.permute(3, 2, 0, 1).contiguous(),
        "patch_embed.proj.bias": get("embedding/bias", 1),
        "cls_token": get("cls", 3),
        "pos_embed": get("Transformer/posembed_input/pos_embedding", 3),
        "norm.weight": get("Transformer/encoder_norm/scale", 1),
        "norm.bias": get("Transformer/encoder_norm/bias", 1),
    }
    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    heads = None
    for i in range(depth):
        pre, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = pre + "MultiHeadDotProductAttention_1/"
        q = get(att + "query/kernel", 3)  # [C, H, D]
        heads = q.shape[1]
        qkv_w = [get(f"{att}{n}/kernel", 3).reshape(C, -1).t() for n in ("query", "key", "value")]
        sd.update(
            {
                dst + "norm1.weight": get(pre + "LayerNorm_0/scale", 1),
                dst + "norm1.bias": get(pre + "LayerNorm_0/bias", 1),
                dst + "attn.qkv.weight": torch.cat(qkv_w, 0),
                dst + "attn.proj.weight": get(att + "out/kernel", 3).reshape(-1, C).t(),
                dst + "attn.proj.bias": get(att + "out/bias", 1),
                dst + "norm2.weight": get(pre + "LayerNorm_2/scale", 1),
                dst + "norm2.bias": get(pre + "LayerNorm_2/bias", 1),
                dst + "mlp.fc1.weight": get(pre + "MlpBlock_3/Dense_0/kernel", 2).t(),
                dst + "mlp.fc1.bias": get(pre + "MlpBlock_3/Dense_0/bias", 1),
                dst + "mlp.fc2.weight": get(pre + "MlpBlock_3/Dense_1/kernel", 2).t(),
                dst + "mlp.fc2.bias": get(pre + "MlpBlock_3/Dense_1/bias", 1),
            }
        )
        if att + "query/bias" in w:
            sd[dst + "attn.qkv.bias"] = torch.cat(
                [get(f"{att}{n}/bias", 2).reshape(-1) for n in ("query", "key", "value")], 0
            )
    if "head/kernel" in w:
        sd["head.weight"] = get("head/kernel", 2).t()
        sd["head.bias"] = get("head/bias", 1)
    sd = {k: v.contiguous() for k, v in sd.items()}
    known = {
        "embedding/kernel",
        "embedding/bias",
        "cls",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoder_norm/scale",
        "Transformer/encoder_norm/bias",
        "head/kernel",
        "head/bias",
    }
    skipped = sorted(k for k in w if k not in known and not k.startswith("Transformer/encoderblock_"))
    unknown = [k for k in skipped if not k.startswith("pre_logits/")]
    if unknown:
        raise ValueError(f"key {unknown[0]!r} is not part of a JAX ViT release")
    return sd, skipped, heads
