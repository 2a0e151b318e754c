"""Hugging Face ViT weights (``transformers.ViTModel`` / ``ViTForImageClassification``, as
``save_pretrained`` writes them: ``config.json`` + ``model.safetensors``) in timm's parameter names,
which :class:`dcal.models.DCALViT` shares. Nothing is downloaded; transformers is not needed.

    vit.embeddings.cls_token / position_embeddings        -> cls_token / pos_embed
    vit.embeddings.patch_embeddings.projection            -> patch_embed.proj
    vit.encoder.layer.{i}.layernorm_before / _after       -> blocks.{i}.norm1 / norm2
    vit.encoder.layer.{i}.attention.attention.{query,key,value} -> blocks.{i}.attn.qkv (concatenated)
    vit.encoder.layer.{i}.attention.output.dense          -> blocks.{i}.attn.proj
    vit.encoder.layer.{i}.intermediate.dense / output.dense -> blocks.{i}.mlp.fc1 / fc2
    vit.layernorm                                         -> norm
    classifier                                            -> head
    pooler.*                                              skipped (ViTModel's pooler: unused)

Hugging Face ViTs default to ``layer_norm_eps=1e-12``; the DCAL ViT uses 1e-6 (timm's).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

import torch

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}


def hf_vit_to_timm(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A Hugging Face ``ViTModel`` / ``ViTForImageClassification`` state dict in timm's names
    (query/key/value concatenated into ``qkv``); returns (state dict, keys left out: pooler)."""
    out, skipped, qkv = {}, [], {}
    for key, v in sd.items():
        k = key[len("vit.") :] if key.startswith("vit.") else key
        if k.startswith("pooler."):
            skipped.append(key)
            continue
        if k.startswith("classifier."):
            out["head." + k[len("classifier.") :]] = v
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        if k in simple:
            out[simple[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if m:
            i, rest = m.group(1), m.group(2)
            a = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if a:
                qkv.setdefault((i, a.group(2)), {})[a.group(1)] = v
                continue
            mod, _, kind = rest.rpartition(".")
            if mod in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[mod]}.{kind}"] = v
                continue
        raise ValueError(f"key {key!r} is not part of a Hugging Face ViT (ViTModel / ViTForImageClassification)")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise ValueError(f"encoder.layer.{i}.attention.attention.{missing[0]}.{kind} is missing")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out, sorted(skipped)


def read_hf_vit(folder: str) -> Tuple[Dict[str, torch.Tensor], List[str], dict]:
    """(timm-named state dict, skipped keys, config.json) of a Hugging Face ViT folder.
    Raises ValueError naming the file or key that does not fit."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{folder} has no config.json (expected a Hugging Face ViT folder)")
    with open(cfg_path) as f:
        hf = json.load(f)
    if not isinstance(hf, dict) or hf.get("model_type") != "vit":
        raise ValueError(f"{cfg_path}: model_type must be 'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{cfg_path}: hidden_act {hf.get('hidden_act')!r}; the model's MLP uses the exact GELU")
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        raw = load_file(path, device="cpu")
    else:
        path = os.path.join(folder, "pytorch_model.bin")
        if not os.path.isfile(path):
            raise ValueError(f"{folder} holds no model.safetensors or pytorch_model.bin")
        raw = torch.load(path, map_location="cpu", weights_only=True)
    sd, skipped = hf_vit_to_timm(raw)
    return sd, skipped, hf
