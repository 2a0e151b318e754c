"""Argument checks shared by the public ops. Each raises before any kernel launches, with a
message that names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def same_kind(ref_name: str, ref: Tensor, name: str, t: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all inputs must share one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")


def scale(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    return float(value)


def segments(q: Tensor, kv: Sequence) -> list:
    if isinstance(kv, (Tensor, str)) or not hasattr(kv, "__len__"):
        raise TypeError("kv must be a sequence of (k, v) pairs, each [B, H, Nk, D]")
    kv = list(kv)
    if len(kv) == 0:
        raise ValueError("kv must hold at least one (k, v) pair")
    B, H, _, D = q.shape
    out = []
    for i, pair in enumerate(kv):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"kv[{i}] must be a (k, v) pair, got {type(pair).__name__}")
        k, v = pair
        kn, vn = f"kv[{i}][0] (k)", f"kv[{i}][1] (v)"
        tensor(kn, k, 4, "[B, H, Nk, D]")
        tensor(vn, v, 4, "[B, H, Nk, D]")
        for n, t in ((kn, k), (vn, v)):
            same_kind("q", q, n, t)
            if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
                raise ValueError(
                    f"{n} has shape {tuple(t.shape)}; expected batch {B}, heads {H} and head dim {D} "
                    f"as q {tuple(q.shape)} ([B, H, Nk, D])")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"{kn} has {k.shape[2]} tokens but {vn} has {v.shape[2]}; k and v must have the same length")
        if k.shape[2] < 1:
            raise ValueError(f"{kn} has no tokens; each segment needs at least one key")
        out.append((k, v))
    if q.shape[2] < 1:
        raise ValueError(f"q has no tokens (shape {tuple(q.shape)}); Nq must be >= 1")
    return out


def kernel_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"kernel_size must be an odd int >= 3, got {type(value).__name__}")
    if value < 3 or value % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 3, got {value}")
    return value


def border(value, borders) -> str:
    if value not in borders:
        raise ValueError(f"border must be one of {borders}, got {value!r}")
    return value


def dilation(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dilation must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"dilation must be an int >= 1, got {value}")
    return value
