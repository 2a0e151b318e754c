"""Loading timm ViT checkpoints (state dicts, ``.safetensors``, ``.pth``) into a :class:`DCALViT`.

timm's ``VisionTransformer`` (class token, ``global_pool="token"``, no layer scale, no registers,
no qk-norm: ViT-B/16, ViT-S/16, DeiT without distillation token ...) uses the same parameter
names as :class:`DCALViT`::

    cls_token, pos_embed [1, 1 + g*g, C], patch_embed.proj.{weight, bias},
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias},
    norm.{weight, bias}, head.{weight, bias}

so the weights copy one to one; the position grid g x g is resized to the model's grid with
timm's own ``timm.layers.resample_abs_pos_embed`` when timm is installed (bicubic, antialiased:
the same resize written out in :func:`dcal.models.vit_npz.resample_pos_embed` otherwise). The GLCA
block (own weights) starts as a copy of the last SA block, ``glca_norm`` as ``norm``. Keys the
model cannot take (layer scale ``ls1.gamma``, ``fc_norm``, ``reg_token``, ``dist_token``, qk-norm
weights, ...) raise naming them: nothing is dropped silently.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Union

import torch

from dcal.models.vit_npz import resample_pos_embed

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def read_state_dict(source: Source) -> Dict[str, torch.Tensor]:
    """A state dict from a mapping or a file: ``.safetensors`` (needs the ``safetensors``
    package), else ``torch.load(weights_only=True)``. Unwraps ``{"state_dict": ...}`` /
    ``{"model": ...}`` training checkpoints and a DDP ``module.`` prefix."""
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = os.fspath(source)
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as e:  # pragma: no cover - safetensors is in the compat extra
                raise ImportError(
                    f"{path}: reading .safetensors needs the safetensors package (pip install 'dcal[compat]')"
                ) from e
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if "pos_embed" not in sd and isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_timm_vit(model, source: Source, *, load_head: Optional[bool] = None) -> Dict[str, list]:
    """Copy a timm ViT checkpoint into ``model`` (a :class:`DCALViT`), in place.

    ``load_head``: None loads ``head`` (into ``head`` and ``glca_head``) when its class count
    matches the model's and skips it otherwise; True requires it; False skips it.
    Returns ``{"loaded": [...], "skipped": [...]}`` (model parameter names / checkpoint keys).
    Raises ValueError naming the key when one is missing, unexpected or of the wrong shape.
    """
    c = model.config
    sd = read_state_dict(source)
    params = dict(model.named_parameters())
    own = {k for k in params if not k.startswith(("glca_", "loss_weights"))}
    unexpected = sorted(set(sd) - own)
    if unexpected:
        raise ValueError(
            f"checkpoint keys the DCAL ViT cannot take: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} (layer scale, registers, qk-norm, "
            f"fc_norm or another architecture)"
        )
    head_keys = {"head.weight", "head.bias"}
    missing = sorted(own - set(sd) - head_keys)
    if missing:
        raise ValueError(
            f"checkpoint misses {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"(expected a timm ViT with depth={c.depth}, qkv_bias={c.qkv_bias})"
        )
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        n = pos.shape[1] - 1 if pos.dim() == 3 else -1
        if n < 1 or int(n**0.5) ** 2 != n or pos.shape[-1] != c.embed_dim:
            raise ValueError(
                f"pos_embed has shape {tuple(pos.shape)}, expected [1, 1 + g*g, {c.embed_dim}] "
                f"(a class token and a square grid)"
            )
        sd["pos_embed"] = resample_pos_embed(pos, c.grid)
    head_ok = all(k in sd and sd[k].shape == params[k].shape for k in head_keys)
    if load_head and not head_ok:
        got = {k: tuple(sd[k].shape) for k in head_keys if k in sd}
        raise ValueError(
            f"load_head=True but the checkpoint's head {got or 'is missing'} does not fit num_classes={c.num_classes}"
        )
    use_head = head_ok if load_head is None else bool(load_head)
    skipped = [] if use_head else sorted(head_keys & set(sd))
    sd = {k: v for k, v in sd.items() if k not in skipped}
    for k, v in sd.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(
                f"checkpoint key {k!r} has shape {tuple(v.shape)}, expected {tuple(params[k].shape)} "
                f"(embed_dim={c.embed_dim}, num_heads={c.num_heads}, patch_size={c.patch_size})"
            )
    if hasattr(model, "glca_block"):
        last = f"blocks.{c.depth - 1}."
        sd.update({"glca_block." + k[len(last) :]: v for k, v in sd.items() if k.startswith(last)})
        sd["glca_norm.weight"], sd["glca_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
        if use_head:
            sd["glca_head.weight"], sd["glca_head.bias"] = sd["head.weight"], sd["head.bias"]
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value.to(params[name].dtype))
    return {"loaded": sorted(sd), "skipped": skipped}
