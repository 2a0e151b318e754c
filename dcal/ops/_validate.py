"""The one validation layer every backend passes through.

Each public op calls one function here (:func:`mkv_args`, :func:`na2d_args`, :func:`rollout_args`)
before a backend is chosen, so every backend accepts exactly the same inputs. Each check raises
before any kernel launches, with a message that names the argument and what was expected
(``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, device or value).

What is accepted (docs/inputs.md):
- tensors: strided (not sparse, not nested), floating (float16, bfloat16, float32, float64), all
  inputs of one call on one device with one dtype; any strides (views, permutations, slices,
  stride-0 expands) are read in place or copied by the backend.
- head dim D >= 1 (D = 0 has no ``D ** -0.5`` and no dot product: refused, naming ``q``).
- ``scale``: None or a finite real number (NaN or inf would make every output NaN or every
  softmax one-hot by accident: refused, naming ``scale``).
- empty sizes where the math defines an empty result: B = 0, H = 0, Nq = 0, X = 0 or Y = 0 give
  an empty output (and zero gradients) on every backend without calling a kernel
  (:func:`empty_result`); a key/value segment with no tokens is allowed when another segment has
  keys (it adds nothing to the softmax); no key at all is refused (softmax over nothing).
  Rollout: B = 0 or N = 0 gives an empty [B, N]; H = 0 is refused (mean over no heads).
- neighborhood attention: kernel_size odd in [3, 2**15), dilation in [1, 2**15), map sides
  below 2**30, clamp border needs a map of at least kernel_size * dilation per non-empty axis.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OP_NAMES = ("multi_kv_attention", "pwca_attention", "attention_rollout", "neighborhood_attention2d")
MAX_KERNEL = 1 << 15  # kernel_size and dilation bound (the C++/CUDA geometry is int32)
MAX_SIDE = 1 << 30  # map side bound
F32_MAX = float(torch.finfo(torch.float32).max)
F32_ZERO = 2.0**-150  # below this a float rounds to 0 in float32 (half the smallest subnormal)


# ----------------------------------------------------------------------------- single arguments


def tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        kind = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor of shape {layout}, got a {kind} tensor")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def same_kind(ref_name: str, ref: Tensor, name: str, t: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all inputs must share one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")


def head_dim(name: str, t: Tensor, layout: str) -> int:
    d = t.shape[-1]
    if d < 1:
        raise ValueError(f"{name} has head dim 0 (shape {tuple(t.shape)} {layout}); the head dim D must be >= 1")
    return d


def scale(value, dtype: Optional[torch.dtype] = None) -> Optional[float]:
    """None or a finite float. The kernels apply the scale in float32 for every dtype but float64,
    so there it must be finite in float32 too, and one that rounds to 0 in float32 is 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a finite float or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None (D ** -0.5), got {value}")
    if dtype is not None and dtype != torch.float64:
        if abs(value) > F32_MAX:
            raise ValueError(
                f"scale {value} overflows float32, the precision {dtype} inputs are scaled in; "
                f"expected |scale| <= {F32_MAX:.4g}"
            )
        if abs(value) < F32_ZERO:
            value = 0.0
    return value


def resolve_scale(value: Optional[float], d: int) -> float:
    return d**-0.5 if value is None else value


def _int(value):
    """An integer (int, numpy or 0-dim torch integer; not bool) as int, else None."""
    if isinstance(value, bool) or isinstance(value, float) or (isinstance(value, Tensor) and value.is_floating_point()):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def kernel_size(value) -> int:
    value = _int(value) if _int(value) is not None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"kernel_size must be an odd int >= 3, got {type(value).__name__}")
    if value < 3 or value % 2 == 0 or value >= MAX_KERNEL:
        raise ValueError(f"kernel_size must be an odd int >= 3 (and < {MAX_KERNEL}), got {value}")
    return value


def border(value, borders) -> str:
    if not isinstance(value, str) or value not in borders:
        raise ValueError(f"border must be one of {borders}, got {value!r}")
    return value


def dilation(value) -> int:
    value = _int(value) if _int(value) is not None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dilation must be an int >= 1, got {type(value).__name__}")
    if value < 1 or value >= MAX_KERNEL:
        raise ValueError(f"dilation must be an int >= 1 (and < {MAX_KERNEL}), got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- multi_kv_attention


def segments(q: Tensor, kv: Sequence) -> list:
    if isinstance(kv, (Tensor, str, bytes)) or not hasattr(kv, "__len__") or not hasattr(kv, "__iter__"):
        raise TypeError(f"kv must be a sequence of (k, v) pairs, each [B, H, Nk, D], got {type(kv).__name__}")
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
                    f"as q {tuple(q.shape)} ([B, H, Nk, D])"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"{kn} has {k.shape[2]} tokens but {vn} has {v.shape[2]}; k and v must have the same length"
            )
        out.append((k, v))
    return out


def mkv_args(q, kv, scale_, return_lse) -> Tuple[list, list, Optional[float]]:
    """Checks a multi_kv_attention call. Returns (segments with keys, segments without keys,
    scale or None). Refuses a call with no key at all unless its result is empty anyway."""
    tensor("q", q, 4, "[B, H, Nq, D]")
    kv = segments(q, kv)
    head_dim("q", q, "[B, H, Nq, D]")
    s = scale(scale_, q.dtype)
    flag("return_lse", return_lse)
    full = [(k, v) for k, v in kv if k.shape[2] > 0]
    empty = [(k, v) for k, v in kv if k.shape[2] == 0]
    B, H, Nq, _ = q.shape
    if not full and B * H * Nq > 0:
        raise ValueError(
            f"kv holds no key (every segment has Nk = 0: {[tuple(k.shape) for k, _ in kv]}); the softmax needs "
            "at least one key in some segment"
        )
    return full, empty, s


# ----------------------------------------------------------------------------- neighborhood


def na2d_args(q, k, v, kernel_size_, border_, rpb, scale_, dilation_, borders):
    tensor("q", q, 5, "[B, H, X, Y, D]")
    tensor("k", k, 5, "[B, H, X, Y, D]")
    tensor("v", v, 5, "[B, H, X, Y, D]")
    same_kind("q", q, "k", k)
    same_kind("q", q, "v", v)
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected the shape of q {tuple(q.shape)} [B, H, X, Y, D]")
    if v.shape != q.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected the shape of q {tuple(q.shape)} [B, H, X, Y, D]")
    head_dim("q", q, "[B, H, X, Y, D]")
    ks = kernel_size(kernel_size_)
    bd = border(border_, borders)
    dil = dilation(dilation_)
    B, H, X, Y, D = q.shape
    if X >= MAX_SIDE or Y >= MAX_SIDE:
        raise ValueError(f"q's map {X}x{Y} is too large (each side must be < {MAX_SIDE})")
    if bd == "clamp" and X * Y > 0 and (X < ks * dil or Y < ks * dil):
        raise ValueError(
            f"border='clamp' needs a map of at least kernel_size*dilation x kernel_size*dilation "
            f"({ks * dil}x{ks * dil}: kernel_size {ks}, dilation {dil}), got {X}x{Y}; "
            "use border='zero' or 'mask' for smaller maps"
        )
    if rpb is not None:
        if not isinstance(rpb, Tensor):
            raise TypeError(
                f"rpb must be a tensor [H, 2*kernel_size-1, 2*kernel_size-1] or None, got {type(rpb).__name__}"
            )
        tensor("rpb", rpb, 3, "[H, 2*kernel_size-1, 2*kernel_size-1]")
        want = (H, 2 * ks - 1, 2 * ks - 1)
        if tuple(rpb.shape) != want:
            raise ValueError(
                f"rpb must have shape {want} ([H, 2*kernel_size-1, 2*kernel_size-1]), got {tuple(rpb.shape)}"
            )
        same_kind("q", q, "rpb", rpb)
    return ks, bd, scale(scale_, q.dtype), dil


# ----------------------------------------------------------------------------- rollout


def rollout_args(qs, ks, lses, scale_, residual):
    if isinstance(qs, Tensor) or isinstance(ks, Tensor):
        name = "qs" if isinstance(qs, Tensor) else "ks"
        raise TypeError(f"qs and ks must be sequences of [B, H, N, D] tensors (one per SA block); {name} is a tensor")
    for name, seq in (("qs", qs), ("ks", ks)):
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise TypeError(
                f"qs and ks must be sequences of [B, H, N, D] tensors (one per SA block); "
                f"{name} is a {type(seq).__name__}"
            )
    qs, ks = list(qs), list(ks)
    if len(qs) == 0:
        raise ValueError("qs must hold at least one [B, H, N, D] tensor")
    if len(qs) != len(ks):
        raise ValueError(f"qs has {len(qs)} tensors but ks has {len(ks)}; expected one k per q")
    ref = qs[0]
    tensor("qs[0]", ref, 4, "[B, H, N, D]")
    for name, seq in (("qs", qs), ("ks", ks)):
        for i, t in enumerate(seq):
            tensor(f"{name}[{i}]", t, 4, "[B, H, N, D]")
            same_kind("qs[0]", ref, f"{name}[{i}]", t)
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; expected {tuple(ref.shape)} like qs[0]")
    head_dim("qs[0]", ref, "[B, H, N, D]")
    B, H, N, _ = ref.shape
    if H < 1:
        raise ValueError(f"qs[0] has no heads (shape {tuple(ref.shape)}); the rollout averages over H >= 1 heads")
    if lses is not None:
        if isinstance(lses, Tensor) or isinstance(lses, (str, bytes)) or not hasattr(lses, "__iter__"):
            raise TypeError(f"lses must be None or a sequence of [B, H, N] tensors, got {type(lses).__name__}")
        lses = list(lses)
        if len(lses) != len(qs):
            raise ValueError(f"lses has {len(lses)} tensors but qs has {len(qs)}; expected one per block or None")
        for i, t in enumerate(lses):
            if not isinstance(t, Tensor):
                raise TypeError(f"lses[{i}] must be a [B, H, N] tensor {tuple(ref.shape[:3])}, got {type(t).__name__}")
            if t.is_nested or t.layout != torch.strided:
                raise TypeError(f"lses[{i}] must be a dense (strided) tensor [B, H, N]")
            if t.shape != ref.shape[:3]:
                raise ValueError(f"lses[{i}] must be a [B, H, N] tensor {tuple(ref.shape[:3])}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"lses[{i}] must be a floating tensor (the logsumexps of block {i}), got {t.dtype}")
            if t.device != ref.device:
                raise ValueError(f"lses[{i}] is on {t.device} but qs[0] is on {ref.device}")
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be a float in [0, 1], got {residual!r}")
    return qs, ks, lses, scale(scale_, ref.dtype)


# ----------------------------------------------------------------------------- explain / chosen_backend


def op_name(op) -> str:
    """The dispatch name of a public op name (``pwca_attention`` counts as ``multi_kv_attention``)."""
    if not isinstance(op, str) or op not in OP_NAMES:
        raise ValueError(f"op must be one of {', '.join(OP_NAMES)}; got {op!r}")
    return "multi_kv_attention" if op == "pwca_attention" else op


def probe_tensor(op: str, tensors: tuple) -> Tensor:
    """The tensor that sets device, dtype and head dim for explain / chosen_backend."""
    if not tensors:
        raise TypeError(f"tensors: pass at least one tensor of the {op} call (e.g. q), got none")
    t = tensors[0]
    if isinstance(t, (list, tuple)) and t and all(isinstance(x, Tensor) for x in t):
        raise TypeError(
            f"tensors: pass the tensors themselves (e.g. explain({op!r}, q) or "
            f"explain({op!r}, *qs)), not a {type(t).__name__} of tensors"
        )
    if not isinstance(t, Tensor):
        raise TypeError(f"tensors[0] must be a torch.Tensor (e.g. q), got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError("tensors[0] must have a head dim (shape [..., D]), got a 0-dim tensor")
    return t
