"""``model.pretrained: PATH``: start a run from pretrained weights on disk (nothing is downloaded).

PATH is one of

- a timm ViT checkpoint, ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (a state dict, or a training
  checkpoint wrapping one under ``state_dict`` / ``model``);
- the JAX release of the original ViT, ``.npz`` (``ViT-B_16.npz``: read with numpy,
  ``allow_pickle=False``; see :mod:`dcal.models.vit_npz`);
- a Hugging Face ViT folder as ``ViTModel`` / ``ViTForImageClassification.save_pretrained``
  writes it: ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``);
- a checkpoint of ``python -m dcal.train`` (``checkpoints/step-N.pt``, ``best.pt``), for any model
  the CLI builds.

All ViT sources are first mapped to timm's parameter names (which :class:`dcal.models.DCALViT`
shares), their architecture (width, depth, patch, heads, MLP width, channels) is compared with the
model's, the position embeddings are resized to the model's grid (bicubic, timm's resize), and
the classifier head is loaded only when its class count equals the model's; otherwise it is left
as initialised and reported. Any other difference is an error naming the key.

:func:`load_pretrained` returns the one-line report printed at the start of a run::

    pretrained: loaded 164 tensors, skipped [head.bias, head.weight, pre_logits/bias, pre_logits/kernel] (head: 200 classes, reinitialised)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

KEY = "model.pretrained"
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
HEAD_KEYS = ("head.weight", "head.bias")
OWN_ONLY = ("loss_weights",)  # DCAL's learnable loss weights: no pretrained model has them


class PretrainedError(ValueError):
    """A pretrained source that cannot be used; the message is one line naming the key."""


def _err(msg: str) -> PretrainedError:
    return PretrainedError(f"{KEY}: {msg}")


@dataclass
class Source:
    path: str
    kind: str  # "npz" | "hf" | "state_dict"
    sd: Dict[str, torch.Tensor]
    skipped: List[str] = field(default_factory=list)  # source keys that no model takes
    arch: Dict[str, int] = field(default_factory=dict)  # what the source tells beyond its shapes (num_heads)
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def check_path(path) -> str:
    """The path, if it can be a pretrained source (exists, known kind); one-line error otherwise.
    Cheap: run before any data or model is built."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise _err(f"expected a path to a .safetensors, .pth, .npz file or a Hugging Face ViT folder, got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _err(
                f"{path} is a folder without config.json (expected a Hugging Face ViT folder: "
                f"config.json + model.safetensors)"
            )
        if not any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "pytorch_model.bin")):
            raise _err(f"{path} holds config.json but no model.safetensors or pytorch_model.bin")
        return path
    if not os.path.exists(path):
        raise _err(f"{path} does not exist (nothing is downloaded: give a local file)")
    if not path.endswith(SUFFIXES):
        raise _err(f"{path}: unknown kind of file; expected one of {', '.join(SUFFIXES)} or a Hugging Face ViT folder")
    return path


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (library messages run long)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = re.split(r"(?<=[.:])\s", text.splitlines()[0], maxsplit=1)[0].rstrip(".:")
    return f"{type(e).__name__}: {first[:160]}"


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors comes with timm / transformers
            raise _err(
                f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
            ) from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise _err(f"{path} cannot be read as safetensors ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _err(f"{path} cannot be read ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise _err(f"{path} holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapper]
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise _err(f"{path} is not a state dict of tensors (key {bad[0]!r})" if bad else f"{path} holds no tensors")
    return obj


def _read_npz(path: str) -> Source:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    except Exception as e:
        raise _err(f"{path} cannot be read as .npz ({_first_line(e)})") from None
    from dcal.models.vit_npz import npz_to_timm

    try:
        sd, skipped, heads = npz_to_timm(arrays)
    except ValueError as e:
        raise _err(f"{path}: {e}") from None
    return Source(path, "npz", sd, skipped, {"num_heads": heads} if heads else {})


def _read_hf(path: str) -> Source:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except Exception as e:
        raise _err(f"{cfg_path} cannot be read ({_first_line(e)})") from None
    if not isinstance(hf, dict):
        raise _err(f"{cfg_path} is not a JSON object")
    if hf.get("model_type") != "vit":
        raise _err(
            f"{cfg_path} has model_type {hf.get('model_type')!r}; only Hugging Face ViT (model_type 'vit') "
            f"folders are read"
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise _err(f"{cfg_path} has hidden_act {act!r}; the model's MLP uses the exact GELU ('gelu')")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        weights = os.path.join(path, "pytorch_model.bin")
    raw = _read_weights(weights)
    from dcal.models.vit_hf import hf_vit_to_timm

    try:
        sd, skipped = hf_vit_to_timm(raw)
    except ValueError as e:
        raise _err(f"{weights}: {e}") from None
    src = Source(path, "hf", sd, skipped)
    if isinstance(hf.get("num_attention_heads"), int):
        src.arch["num_heads"] = hf["num_attention_heads"]
    eps = hf.get("layer_norm_eps")
    if isinstance(eps, (int, float)) and eps != 1e-6:
        src.notes.append(f"layer_norm_eps {eps:g} in config.json, the model uses 1e-06")
    return src


def read_source(path) -> Source:
    """The weights at ``path`` with ViT keys in timm's names (see the module docstring)."""
    path = check_path(path)
    if os.path.isdir(path):
        return _read_hf(path)
    if path.endswith(".npz"):
        return _read_npz(path)
    return Source(path, "state_dict", _read_weights(path))


# ----------------------------------------------------------------------------- architecture


def vit_arch(sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Width, patch, channels, depth, MLP width and qkv bias read off a timm-named ViT state dict
    (empty when ``sd`` is not one)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        return {}
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    arch = {"embed_dim": w.shape[0], "in_chans": w.shape[1], "patch_size": w.shape[2], "depth": depth}
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        arch["mlp_hidden"] = fc1.shape[0]
    if "blocks.0.attn.qkv.weight" in sd:
        arch["qkv_bias"] = int("blocks.0.attn.qkv.bias" in sd)
    return arch


_ARCH_KEY = {
    "embed_dim": "embed_dim",
    "in_chans": "in_chans",
    "patch_size": "patch_size",
    "depth": "depth",
    "mlp_hidden": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "num_heads": "num_heads",
}
_ARCH_WHAT = {"mlp_hidden": "MLP width", "qkv_bias": "qkv bias", "in_chans": "input channels"}


def _model_heads(model: nn.Module) -> Optional[int]:
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn"):
        return getattr(blocks[0].attn, "num_heads", None)
    return None


def check_arch(src: Source, model: nn.Module) -> None:
    """One-line error at the first architecture difference, naming the config key to change."""
    own_sd = {k: v for k, v in model.state_dict().items()}
    mine, theirs = vit_arch(own_sd), {**vit_arch(src.sd), **src.arch}
    heads = _model_heads(model)
    if heads is not None:
        mine["num_heads"] = heads
    if not mine:
        return
    if not theirs:
        raise _err(
            f"{src.path} is not a ViT checkpoint (no patch_embed.proj.weight after mapping "
            f"{'its' if src.kind == 'state_dict' else 'the ' + src.kind} keys); the model is a ViT"
        )
    for key in ("embed_dim", "patch_size", "in_chans", "depth", "num_heads", "mlp_hidden", "qkv_bias"):
        if key in mine and key in theirs and mine[key] != theirs[key]:
            what = _ARCH_WHAT.get(key, key)
            a, b = theirs[key], mine[key]
            if key == "qkv_bias":
                a, b = bool(a), bool(b)
            raise _err(
                f"{src.path} is a ViT with {what} {a}, the model has {b} (set model.{_ARCH_KEY[key]} "
                f"to match, or use another checkpoint)"
            )


# ----------------------------------------------------------------------------- loading


def _resize_pos(sd, model) -> None:
    pos, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or tuple(pos.shape) == tuple(own.shape):
        return
    prefix_model = own.shape[1] - _grid_tokens(model)
    n_src = pos.shape[1] - prefix_model if pos.dim() == 3 else -1
    g = int(round(n_src**0.5)) if n_src > 0 else 0
    if pos.dim() != 3 or g * g != n_src or pos.shape[-1] != own.shape[-1]:
        raise _err(f"pos_embed has shape {tuple(pos.shape)}, expected [1, {prefix_model} + g*g, {own.shape[-1]}]")
    from timm.layers import resample_abs_pos_embed

    gh = int(round(_grid_tokens(model) ** 0.5))
    grid = list(getattr(getattr(model, "patch_embed", None), "grid_size", None) or (gh, gh))
    sd["pos_embed"] = resample_abs_pos_embed(
        pos.float(), new_size=grid, old_size=[g, g], num_prefix_tokens=prefix_model
    ).to(pos.dtype)


def _grid_tokens(model) -> int:
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "num_patches", None):
        return int(pe.num_patches)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_patches"):
        return int(cfg.num_patches)
    return model.pos_embed.shape[1] - 1


def _head_names(model: nn.Module) -> List[str]:
    names = [k for k in model.state_dict() if k in HEAD_KEYS or k.startswith(("glca_head.", "head.fc."))]
    return names


def load_state(model: nn.Module, sd: Dict[str, torch.Tensor], path: str, extra_skipped=(), derived=()) -> str:
    """Copy ``sd`` (model names) into ``model``: every model tensor must be there with its shape,
    except the classifier heads, which are left as initialised when their shape differs.
    ``derived``: keys of ``sd`` made from others (not in the source; not reported as skipped)."""
    own = model.state_dict()
    heads = set(_head_names(model))
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        why = (
            "another ViT architecture (layer scale, registers, qk-norm, fc_norm ...)"
            if "patch_embed.proj.weight" in own
            else f"the weights of another model than {type(model).__name__}"
        )
        raise _err(
            f"{path}: key {unexpected[0]!r} is not in the model"
            f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}: {why}"
        )
    missing = sorted(k for k in set(own) - set(sd) - heads - set(OWN_ONLY))
    if missing:
        raise _err(
            f"{path}: the model's {missing[0]!r} is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
        )
    skipped = list(extra_skipped)
    take = {}
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            if k in heads:
                skipped.append(k)
                continue
            raise _err(f"{path}: key {k!r} has shape {list(v.shape)}, the model's is {list(own[k].shape)}")
        take[k] = v
    skipped += [k for k in heads if k not in sd]
    skipped = sorted(k for k in set(skipped) if k not in derived and not k.startswith("glca_"))
    with torch.no_grad():
        for k, v in take.items():
            own[k].copy_(v.to(own[k].dtype))
    return _report(model, len(take), skipped)


def _report(model, n: int, skipped: List[str]) -> str:
    head = next((t for k, t in model.state_dict().items() if k in ("head.weight", "head.fc.weight")), None)
    if head is None:
        tail = ""
    else:
        fate = "reinitialised" if any(k.endswith("head.weight") or k == "head.fc.weight" for k in skipped) else "loaded"
        tail = f" (head: {head.shape[0]} classes, {fate})"
    return f"pretrained: loaded {n} tensors, skipped [{', '.join(skipped)}]{tail}"


def load_pretrained(model: nn.Module, path) -> str:
    """Load ``path`` into ``model`` (in place) and return the report line; one-line
    :class:`PretrainedError` naming the key otherwise. Nothing is changed in the model when the
    source does not fit (every check runs before the first copy)."""
    src = read_source(path)
    sd = dict(src.sd)
    from dcal.models.dcal_vit import DCALViT

    vit_like = "patch_embed.proj.weight" in model.state_dict()
    if vit_like:
        check_arch(src, model)
        _resize_pos(sd, model)
    derived = set()
    if isinstance(model, DCALViT) and not any(k.startswith("glca_") for k in sd):
        # a plain ViT: the GLCA block starts as the last SA block, glca_norm/glca_head as norm/head
        c = model.config
        has = model.state_dict()
        if "glca_block.norm1.weight" in has:
            last = f"blocks.{c.depth - 1}."
            sd.update({"glca_block." + k[len(last) :]: v for k, v in sd.items() if k.startswith(last)})
            for part in ("weight", "bias"):
                if f"norm.{part}" in sd:
                    sd[f"glca_norm.{part}"] = sd[f"norm.{part}"]
                if f"head.{part}" in sd:
                    sd[f"glca_head.{part}"] = sd[f"head.{part}"]
            derived = {k for k in sd if k.startswith("glca_")}
    report = load_state(model, sd, src.path, extra_skipped=src.skipped, derived=derived)
    return report + "".join(f"; note: {n}" for n in src.notes)
