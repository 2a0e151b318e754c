"""Pictures of where a trained model looks.

``python -m dcal.visualize --checkpoint C --images IMG... --out DIR`` writes, per image,
``DIR/<image name>.png``: for a DCAL ViT, the image with the attention-rollout heat map
(:func:`dcal.ops.attention_rollout` from the SA blocks' queries and keys: no attention map is
formed), the patches GLCA takes as its local queries outlined, and the top-5 classes with their
probabilities. For a BEV model (``model.name: bev``), the attention of every head of every layer
of the query at a chosen cell (``--cell X,Y``) over its neighbourhood; its inputs are maps saved
as ``.pt`` / ``.npy`` ([C, X, Y]).

``--val N`` (repeatable) takes the N-th sample of the run's validation set instead of a file.
The checkpoint is one the training loop wrote (``checkpoints/best.pt``, ``step-*.pt``): it holds
the run's config, from which the model and the input preprocessing are rebuilt. Nothing is
downloaded. Drawing needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class VisualizeError(ValueError):
    """A refusal of the command line: printed as one line."""


# ----------------------------------------------------------------------------- the run


def load_run(checkpoint: str, overrides: Sequence[str] = ()):
    """(model in eval mode, config, validation set, class names) of a training checkpoint."""
    from dcal.train import config as C
    from dcal.train.build import build_task
    from dcal.train.checkpoint import load

    if not os.path.isfile(checkpoint):
        raise VisualizeError(f"--checkpoint: no file {checkpoint}")
    try:
        state = load(checkpoint, map_location="cpu")
    except ValueError as e:
        raise VisualizeError(f"--checkpoint: {e}") from None
    if not isinstance(state, dict) or "model" not in state or not state.get("config"):
        raise VisualizeError(
            f"--checkpoint: {checkpoint} is not a checkpoint of python -m dcal.train (no model and config in it)"
        )
    cfg = C.from_dict(state["config"], list(overrides))
    task = build_task(cfg, seed=cfg.train.seed)
    model = task.model_factory()
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise VisualizeError(f"--checkpoint: the weights do not fit the model of its config: {first}") from None
    model.eval()
    val = task.val_set
    classes = getattr(val, "classes", None) or [f"class {i}" for i in range(_num_classes(model, val))]
    return model, cfg, val, classes


def _num_classes(model, val) -> int:
    n = getattr(val, "num_classes", None)
    if n:
        return int(n)
    return int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)


def _display(x: Tensor, cfg) -> Tensor:
    """A normalised input [3, S, S] back to [0, 1] RGB for drawing."""
    from dcal.train import data as D

    if cfg.data["name"] == "synthetic":
        return (x * 0.25 + 0.5).clamp(0, 1)
    mean = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def load_image(path: str, cfg) -> Tensor:
    """An image file as the run's validation transform makes it: [3, S, S], normalised."""
    from PIL import Image, UnidentifiedImageError

    from dcal.train import data as D

    if not os.path.isfile(path):
        raise VisualizeError(f"--images: no file {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise VisualizeError(f"--images: cannot read {path} as an image ({e})") from None
    name = cfg.data["name"]
    if name == "synthetic":
        size = int(cfg.model.get("img_size") or cfg.data.get("img_size", 64))
        rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
        import numpy as np

        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - 0.5) / 0.25
    resize, crop = int(cfg.data.get("resize", 550)), int(cfg.data.get("crop", 448))
    return D.ImageTransform(False, resize, crop)(img, torch.Generator())


# ----------------------------------------------------------------------------- DCAL ViT


@torch.no_grad()
def dcal_vit_views(model, x: Tensor) -> Dict[str, Any]:
    """For images x [B, 3, S, S]: ``rollout`` [B, grid, grid] (the CLS row of the rollout over the
    patches, from :func:`dcal.ops.attention_rollout`), ``local`` [B, R] patch indices GLCA takes
    as local queries (None without a GLCA branch) and ``probs`` [B, classes] (mean over the
    branches of the class probabilities)."""
    from dcal import ops

    c = model.config
    h = model.embed(x)
    stats = []
    for blk in model.blocks:
        h, st = blk(h, return_rollout=True)
        stats.append(st)
    qs, ks, lses = (list(None if t is None else t.detach() for t in z) for z in zip(*stats))
    if any(t is None for t in lses):
        lses = None
    backend = None if c.backend == "sdpa" else c.backend
    r = ops.attention_rollout(
        qs, ks, lses=lses, scale=model.blocks[0].attn.scale, residual=c.rollout_residual, backend=backend
    )
    local = model.glca_index(stats)[:, 1:] - 1 if "glca" in c.branches else None
    out = model(x)
    # eval: the sum of the softmaxes of the SA and GLCA heads (PWCA runs in training only)
    probs = out / len([b for b in c.branches if b != "pwca"])
    return {"rollout": r[:, 1:].reshape(x.shape[0], c.grid, c.grid), "local": local, "probs": probs}


def draw_dcal_vit(
    path: str,
    image: Tensor,
    rollout: Tensor,
    local: Optional[Tensor],
    probs: Tensor,
    classes: List[str],
    title: str,
    label: Optional[str] = None,
) -> None:
    """One picture: the image, the image under the rollout heat map with GLCA's local queries
    outlined, and the top-5 classes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    S = image.shape[-1]
    grid = rollout.shape[-1]
    cell = S / grid
    # the rollout's identity share lifts every patch alike: the picture shows its spread
    lo, hi = rollout.min(), rollout.max()
    heat = (rollout - lo) / (hi - lo).clamp_min(1e-12)
    fig = Figure(figsize=(11, 3.9), dpi=80)
    ax_img, ax_map, ax_bar = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.25]})
    rgb = image.permute(1, 2, 0).numpy()
    ax_img.imshow(rgb, interpolation="nearest" if S <= 64 else "bilinear")
    ax_img.set_title("input" + (f" (label: {label})" if label is not None else ""), fontsize=10)
    ax_map.imshow(rgb, interpolation="nearest" if S <= 64 else "bilinear")
    im = ax_map.imshow(
        heat.numpy(),
        cmap="inferno",
        alpha=0.55,
        extent=(-0.5, S - 0.5, S - 0.5, -0.5),
        interpolation="bilinear",
        vmin=0,
        vmax=1,
    )
    bar = fig.colorbar(im, ax=ax_map, fraction=0.046, pad=0.03)
    bar.set_ticks([0, 1])
    bar.set_ticklabels([f"{lo.item():.3g}", f"{hi.item():.3g}"])
    if local is not None:
        for idx in local.tolist():
            row, col = divmod(int(idx), grid)
            ax_map.add_patch(
                Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False, edgecolor="cyan", lw=1.6)
            )
    n_local = 0 if local is None else len(local)
    ax_map.set_title(
        f"attention rollout; GLCA's {n_local} local queries" if n_local else "attention rollout", fontsize=10
    )
    for ax in (ax_img, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    k = min(5, probs.numel())
    top = probs.topk(k)
    names = [classes[i] if i < len(classes) else f"class {i}" for i in top.indices.tolist()]
    y = list(range(k))[::-1]
    colors = ["tab:green" if label is not None and n == label else "tab:blue" for n in names]
    ax_bar.barh(y, top.values.tolist(), color=colors)
    ax_bar.set_yticks(y)
    ax_bar.set_yticklabels([n if len(n) <= 28 else n[:27] + "..." for n in names], fontsize=9)
    for yi, v in zip(y, top.values.tolist()):
        ax_bar.text(min(v, 1.0) + 0.01, yi, f"{v:.3f}", va="center", fontsize=9)
    ax_bar.set_xlim(0, 1.15)
    ax_bar.set_xlabel("probability")
    ax_bar.set_title("top-5 classes", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- BEV


def _window(i: int, n: int, k: int, border: str) -> List[int]:
    """Key positions (along one axis of length n) of the query at i; None marks off-map
    positions, which take part as zero keys with border 'zero'."""
    if border == "clamp":
        start = min(max(i - k // 2, 0), n - k)
        return list(range(start, start + k))
    return [i + d for d in range(-(k // 2), k // 2 + 1)]


@torch.no_grad()
def bev_cell_attention(body, x: Tensor, cell: Tuple[int, int]) -> Tensor:
    """Attention weights [layers, heads, X, Y] of the query at ``cell`` in every LocalGraphAttention
    block of a :class:`dcal.models.BEVGraphModule` ``body`` on one map ``x`` [C, X, Y] (the
    module's input): the softmax over the query's window, exactly as the op defines it (rpb,
    border mode), placed on the map; zero outside the window (and for off-map positions)."""
    i, j = cell
    h = x[None]
    maps = []
    for blk in body.blocks:
        attn = blk.attn
        B, C, X, Y = h.shape
        if not (0 <= i < X and 0 <= j < Y):
            raise VisualizeError(f"--cell {i},{j} is outside the {X}x{Y} map")
        H, D, k = attn.num_heads, attn.head_dim, attn.kernel_size
        qkv = attn.qkv(attn.norm(h)).view(3, H, D, X, Y)
        q, kk = qkv[0, :, :, i, j], qkv[1]  # [H, D], [H, D, X, Y]
        rows, cols = _window(i, X, k, attn.border), _window(j, Y, k, attn.border)
        logits, where = [], []
        for a in rows:
            for b in cols:
                inside = 0 <= a < X and 0 <= b < Y
                if not inside and attn.border == "mask":
                    continue
                key = kk[:, :, a, b] if inside else torch.zeros(H, D)
                s = (q * key).sum(-1) * D**-0.5
                if attn.rpb is not None:
                    s = s + attn.rpb[:, a - i + k - 1, b - j + k - 1]
                logits.append(s)
                where.append((a, b) if inside else None)
        w = torch.stack(logits, -1).float().softmax(-1)  # [H, window]
        m = torch.zeros(H, X, Y)
        for n, ab in enumerate(where):
            if ab is not None:
                m[:, ab[0], ab[1]] = w[:, n]
        maps.append(m)
        h = blk(h)
    return torch.stack(maps)


def draw_bev(path: str, maps: Tensor, cell: Tuple[int, int], background: Tensor, title: str) -> None:
    from matplotlib.figure import Figure

    L, H = maps.shape[:2]
    fig = Figure(figsize=(2.6 * H + 2.6, 2.5 * L + 0.6), dpi=80)
    axes = fig.subplots(L, H + 1, squeeze=False)
    for layer in range(L):
        ax = axes[layer, 0]
        ax.imshow(background.numpy(), cmap="gray")
        ax.plot(cell[1], cell[0], "r+", ms=10)
        ax.set_title("input channel 0" if layer == 0 else "", fontsize=9)
        ax.set_ylabel(f"layer {layer}")
        for head in range(H):
            ax = axes[layer, head + 1]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0)
            ax.plot(cell[1], cell[0], "r+", ms=8)
            ax.set_title(f"head {head}", fontsize=9)
        for ax in axes[layer]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def load_map(path: str) -> Tensor:
    if not os.path.isfile(path):
        raise VisualizeError(f"--images: no file {path}")
    if path.endswith(".npy"):
        import numpy as np

        t = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, Tensor) or t.dim() != 3:
        raise VisualizeError(f"--images: {path} must hold a map [C, X, Y] for a BEV model")
    return t.float()


# ----------------------------------------------------------------------------- command line


def _parse_cell(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise VisualizeError(f"--cell must be X,Y (two integers), got {text!r}") from None
    return a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by python -m dcal.train")
    p.add_argument(
        "--images",
        nargs="*",
        default=[],
        metavar="IMG",
        help="image files (DCAL ViT) or [C, X, Y] maps as .pt/.npy (BEV)",
    )
    p.add_argument(
        "--val",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also draw the N-th sample of the run's validation set (repeatable)",
    )
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--cell", default=None, help="BEV: the query cell X,Y (default: the map's centre)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's config, e.g. --set data.root=/data/CUB_200_2011",
    )
    args = p.parse_args(argv)
    try:
        if not args.images and not args.val:
            raise VisualizeError("--images: give at least one image (or --val N)")
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            raise VisualizeError("drawing needs matplotlib: pip install matplotlib") from None
        written = run(args)
    except VisualizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the run's config or data
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


def run(args) -> List[str]:
    from dcal.models import DCALViT

    cell = _parse_cell(args.cell)
    model, cfg, val, classes = load_run(args.checkpoint, args.set)
    os.makedirs(args.out, exist_ok=True)
    inputs: List[Tuple[str, Tensor, Optional[int]]] = []
    is_bev = hasattr(model, "body") and hasattr(model.body, "blocks") and not isinstance(model, DCALViT)
    for path in args.images:
        x = load_map(path) if is_bev else load_image(path, cfg)
        inputs.append((os.path.splitext(os.path.basename(path))[0], x, None))
    for n in args.val:
        if not 0 <= n < len(val):
            raise VisualizeError(f"--val {n}: the validation set has {len(val)} samples")
        x, y = val[n]
        inputs.append((f"val-{n}", x, y if isinstance(y, int) else None))
    written = []
    if isinstance(model, DCALViT):
        c = model.config
        for name, x, y in inputs:
            if tuple(x.shape) != (c.in_chans, c.img_size, c.img_size):
                raise VisualizeError(
                    f"{name}: the model takes [{c.in_chans}, {c.img_size}, {c.img_size}], got {tuple(x.shape)}"
                )
            v = dcal_vit_views(model, x[None])
            path = os.path.join(args.out, f"{name}.png")
            top = v["probs"][0].argmax().item()
            draw_dcal_vit(
                path,
                _display(x, cfg),
                v["rollout"][0],
                None if v["local"] is None else v["local"][0],
                v["probs"][0],
                classes,
                f"{name}: predicted {classes[top] if top < len(classes) else top} "
                f"({os.path.basename(args.checkpoint)})",
                label=None if y is None else classes[y],
            )
            written.append(path)
    elif is_bev:
        for name, x, _ in inputs:
            X, Y = x.shape[-2:]
            c = cell or (X // 2, Y // 2)
            maps = bev_cell_attention(model.body, model.proj(x[None])[0], c)
            path = os.path.join(args.out, f"{name}-cell{c[0]}_{c[1]}.png")
            draw_bev(path, maps, c, x[0], f"{name}: attention of the query at cell {c[0]},{c[1]}, per layer and head")
            written.append(path)
    else:
        raise VisualizeError(
            f"--checkpoint: pictures are drawn for model.name dcal_vit and bev, not {cfg.model['name']!r}"
        )
    return written


if __name__ == "__main__":
    sys.exit(main())
