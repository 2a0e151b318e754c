"""Cases and input builders of the three op families, in every memory layout the ops accept.

A :class:`Case` names an op, a shape, the op's keyword arguments and a layout; its inputs are
made by :func:`attention_inputs`, :func:`neighborhood_inputs` or :func:`rollout_inputs`
(:meth:`Case.inputs`), from a generator seeded by the case itself, so a case always gets the
same values. Layouts (:data:`LAYOUTS`; the logical shape is always heads-first):

* ``heads_first``: contiguous ``[B, H, N, D]`` / ``[B, H, X, Y, D]``;
* ``heads_last``: each tensor a transposed view of contiguous ``[B, N, H, D]`` /
  ``[B, X, Y, H, D]`` storage (what a channels-last projection gives);
* ``packed``: strided views of one packed projection (``[B, N, 2, H, D]`` keys and values,
  ``[B, X, Y, 3, H, D]`` queries, keys and values), as models produce them;
* ``noncontig``: every other element of the head dimension of a twice-as-wide tensor (a
  non-unit innermost stride).

Attention shapes: ``B, H, Nq, Nk`` (a tuple, one length per key/value segment), ``D``;
neighborhood ``B, H, X, Y, D``; rollout ``B, H, N, D, L``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

HEADS_FIRST, HEADS_LAST, PACKED, NONCONTIG = "heads_first", "heads_last", "packed", "noncontig"
LAYOUTS = (HEADS_FIRST, HEADS_LAST, PACKED, NONCONTIG)

# Public op name -> op family.
FAMILY = {
    "pwca_attention": "attention",
    "multi_kv_attention": "attention",
    "neighborhood_attention2d": "neighborhood",
    "attention_rollout": "rollout",
}
FAMILIES = ("attention", "neighborhood", "rollout")

SCALE_FACTOR = 1.3  # attention and neighborhood run at D**-0.5 * 1.3, so a dropped scale shows


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


@dataclass(frozen=True)
class Case:
    """One comparison: op (a public op name of :data:`FAMILY`), shape and kwargs (tuples of
    ``(name, value)`` pairs, hashable), layout (:data:`LAYOUTS`), grads (also check gradients).

    kwargs are the op's keyword arguments (neighborhood: kernel_size, border, dilation, ...;
    ``rpb=True`` asks for a random relative position bias; rollout: ``with_lse=True`` passes the
    blocks' logsumexps)."""

    op: str
    shape: Tuple[Tuple[str, object], ...]
    kwargs: Tuple[Tuple[str, object], ...] = ()
    layout: str = HEADS_FIRST
    grads: bool = True

    def __post_init__(self):
        if self.op not in FAMILY:
            raise ValueError(f"op must be one of {', '.join(FAMILY)}, got {self.op!r}")
        _check_layout(self.layout)

    @property
    def s(self) -> Dict[str, Any]:
        return dict(self.shape)

    @property
    def kw(self) -> Dict[str, Any]:
        return dict(self.kwargs)

    @property
    def family(self) -> str:
        return FAMILY[self.op]

    @property
    def packed(self) -> bool:
        return self.layout == PACKED

    def shape_str(self) -> str:
        parts = [] if self.layout == HEADS_FIRST else [self.layout]
        for k, v in self.shape:
            parts.append(f"{k}{'+'.join(map(str, v)) if isinstance(v, tuple) else v}")
        for k, v in self.kwargs:
            parts.append(k if v is True else f"{k}={v}")
        return " ".join(parts)

    def seed(self) -> int:
        return zlib.crc32(f"{self.op} {self.shape_str()}".encode())

    def numel(self) -> int:
        """Elements of q (the largest input)."""
        s = self.s
        if self.family == "neighborhood":
            return s["B"] * s["H"] * s["X"] * s["Y"] * s["D"]
        n = s["Nq"] if self.family == "attention" else s["N"]
        return s["B"] * s["H"] * n * s["D"]

    def inputs(self, dtype, device="cpu"):
        """The case's inputs (:func:`attention_inputs`, ...) in ``dtype`` on ``device``."""
        build = {"attention": attention_inputs, "neighborhood": neighborhood_inputs, "rollout": rollout_inputs}
        return build[self.family](self.s, dtype, device, seed=self.seed(), layout=self.layout, kwargs=self.kw)


def case(op: str, shape: Dict[str, Any], kwargs: Optional[Dict[str, Any]] = None, **opts) -> Case:
    """A :class:`Case` from dicts: ``case("pwca_attention", dict(B=1, H=2, Nq=37, Nk=(37, 37), D=40))``."""
    return Case(op, tuple(shape.items()), tuple((kwargs or {}).items()), **opts)


def _dtype(dtype):
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _rnd(g, device, dtype):
    import torch

    return lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)


def _heads_last(rnd, *dims):
    """A heads-first view ``[B, H, *dims, D]`` of contiguous ``[B, *dims, H, D]`` storage."""
    B, H, D = dims[0], dims[1], dims[-1]
    inner = dims[2:-1]
    t = rnd(B, *inner, H, D)
    n = len(inner)
    return t.permute(0, n + 1, *range(1, n + 1), n + 2)


def _noncontig(rnd, *dims):
    """Every other element of the last dimension of a tensor twice as wide."""
    return rnd(*dims[:-1], 2 * dims[-1])[..., ::2]


class AttentionInputs(NamedTuple):
    q: Any  # [B, H, Nq, D]
    kv: List[Tuple[Any, Any]]  # one (k, v) pair per segment, each [B, H, Nk_i, D]
    dout: Any  # [B, H, Nq, D], contiguous
    dlse: Any  # [B, H, Nq], fp32
    scale: float


def attention_inputs(
    shape: Dict[str, Any], dtype, device="cpu", *, seed: int = 0, layout: str = HEADS_FIRST, kwargs=None
) -> AttentionInputs:
    """Inputs of ``multi_kv_attention`` / ``pwca_attention`` and the cotangents of its outputs."""
    import torch

    _check_layout(layout)
    dtype = _dtype(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, Nq, D = shape["B"], shape["H"], shape["Nq"], shape["D"]
    rnd = _rnd(g, device, dtype)
    if layout == PACKED:  # views of projections laid out [B, N, (2,) H, D], as models produce them
        q = rnd(B, Nq, H, D).transpose(1, 2)
        kv = [tuple(rnd(B, n, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)) for n in shape["Nk"]]
    elif layout == HEADS_LAST:
        q = _heads_last(rnd, B, H, Nq, D)
        kv = [(_heads_last(rnd, B, H, n, D), _heads_last(rnd, B, H, n, D)) for n in shape["Nk"]]
    elif layout == NONCONTIG:
        q = _noncontig(rnd, B, H, Nq, D)
        kv = [(_noncontig(rnd, B, H, n, D), _noncontig(rnd, B, H, n, D)) for n in shape["Nk"]]
    else:
        q = rnd(B, H, Nq, D)
        kv = [(rnd(B, H, n, D), rnd(B, H, n, D)) for n in shape["Nk"]]
    dout = rnd(B, H, Nq, D)
    dlse = torch.randn(B, H, Nq, generator=g, device=device, dtype=torch.float32)
    return AttentionInputs(q, kv, dout, dlse, D**-0.5 * SCALE_FACTOR)


class NeighborhoodInputs(NamedTuple):
    q: Any  # [B, H, X, Y, D]
    k: Any
    v: Any
    rpb: Any  # [H, 2k-1, 2k-1] or None
    dout: Any  # [B, H, X, Y, D], contiguous
    opkw: Dict[str, Any]  # the op's keyword arguments (kernel_size, border, dilation, ...)
    scale: float


def neighborhood_inputs(
    shape: Dict[str, Any], dtype, device="cpu", *, seed: int = 0, layout: str = HEADS_FIRST, kwargs=None
) -> NeighborhoodInputs:
    """Inputs of ``neighborhood_attention2d`` (``kwargs``: its keywords, ``rpb=True`` for a bias)."""
    import torch

    _check_layout(layout)
    dtype = _dtype(dtype)
    kw = dict(kwargs or {})
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, X, Y, D = shape["B"], shape["H"], shape["X"], shape["Y"], shape["D"]
    rnd = _rnd(g, device, dtype)
    if layout == PACKED:  # views of a channels-last qkv projection [B, X, Y, 3, H, D]
        q, k, v = rnd(B, X, Y, 3, H, D).permute(3, 0, 4, 1, 2, 5).unbind(0)
    elif layout == HEADS_LAST:
        q, k, v = (_heads_last(rnd, B, H, X, Y, D) for _ in range(3))
    elif layout == NONCONTIG:
        q, k, v = (_noncontig(rnd, B, H, X, Y, D) for _ in range(3))
    else:
        q, k, v = rnd(B, H, X, Y, D), rnd(B, H, X, Y, D), rnd(B, H, X, Y, D)
    ks = kw.get("kernel_size", 7)
    rpb = rnd(H, 2 * ks - 1, 2 * ks - 1) if kw.get("rpb") else None
    dout = rnd(B, H, X, Y, D)
    opkw = {k_: v_ for k_, v_ in kw.items() if k_ != "rpb"}
    return NeighborhoodInputs(q, k, v, rpb, dout, opkw, D**-0.5 * SCALE_FACTOR)


class RolloutInputs(NamedTuple):
    qs: List[Any]  # L tensors [B, H, N, D]
    ks: List[Any]
    lses: Optional[List[Any]]  # L tensors [B, H, N] (fp32; fp64 for fp64 inputs) or None
    scale: float


def rollout_inputs(
    shape: Dict[str, Any], dtype, device="cpu", *, seed: int = 0, layout: str = HEADS_FIRST, kwargs=None
) -> RolloutInputs:
    """Inputs of ``attention_rollout`` (``kwargs``: ``with_lse=True`` also gives exact logsumexps).
    The queries are spread by 2 (sharper softmaxes, so blocks and heads differ); every layout
    holds the same values."""
    import torch

    _check_layout(layout)
    dtype = _dtype(dtype)
    kw = dict(kwargs or {})
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, N, D, L = shape["B"], shape["H"], shape["N"], shape["D"], shape["L"]
    qs = [(torch.randn(B, H, N, D, generator=g, device=device, dtype=torch.float32) * 2).to(dtype) for _ in range(L)]
    ks = [torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype) for _ in range(L)]
    if layout == PACKED:  # the same values as views of [B, N, 2, H, D] projections
        packed = [
            torch.stack([q, k], 2).permute(0, 3, 2, 1, 4).contiguous().permute(2, 0, 3, 1, 4) for q, k in zip(qs, ks)
        ]
        qs, ks = [p_[0] for p_ in packed], [p_[1] for p_ in packed]
    elif layout == HEADS_LAST:
        qs, ks = ([t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts] for ts in (qs, ks))
    elif layout == NONCONTIG:

        def spread(t):
            wide = torch.zeros(*t.shape[:-1], 2 * D, device=device, dtype=dtype)
            wide[..., ::2] = t
            return wide[..., ::2]

        qs, ks = [spread(t) for t in qs], [spread(t) for t in ks]
    lses = None
    if kw.get("with_lse"):
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        lses = [exact_lse(q, k, D**-0.5).to(stat) for q, k in zip(qs, ks)]
    return RolloutInputs(qs, ks, lses, D**-0.5)


def exact_lse(q, k, scale: float):
    """logsumexp over keys of ``q k^T * scale`` in fp64, one batch at a time (the set-up must
    not hold [B, H, N, N] in fp64)."""
    import torch

    return torch.cat(
        [
            torch.logsumexp(q[b : b + 1].double() @ k[b : b + 1].double().transpose(-1, -2) * scale, -1)
            for b in range(q.shape[0])
        ]
    )


def layout_of(t) -> str:
    """Which of :data:`LAYOUTS` a heads-first view ``[B, H, ..., D]`` is (by its strides)."""
    if t.stride(-1) != 1:
        return NONCONTIG
    if t.is_contiguous():
        return HEADS_FIRST
    # heads-last storage: the head axis (1) is the innermost but one, right above D
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    if t.stride(1) == t.shape[-1] and order[-2] == 1:
        return HEADS_LAST if _dense(t) else PACKED
    return PACKED


def _dense(t) -> bool:
    """Whether the view covers its storage without gaps (a permutation of a contiguous tensor)."""
    n, expect = 1, 1
    for i in sorted(range(t.dim()), key=lambda i: t.stride(i)):
        if t.shape[i] == 1:
            continue
        if t.stride(i) != expect:
            return False
        expect *= t.shape[i]
        n *= t.shape[i]
    return True


def layouts_of(tensors: Sequence[Any]) -> Tuple[str, ...]:
    return tuple(layout_of(t) for t in tensors)


__all__ = [
    "AttentionInputs",
    "Case",
    "FAMILIES",
    "FAMILY",
    "HEADS_FIRST",
    "HEADS_LAST",
    "LAYOUTS",
    "NONCONTIG",
    "NeighborhoodInputs",
    "PACKED",
    "RolloutInputs",
    "attention_inputs",
    "case",
    "exact_lse",
    "layout_of",
    "layouts_of",
    "neighborhood_inputs",
    "rollout_inputs",
]
