"""NATTEN's functional API on dcal's kernels, and the heads-first / heads-last layouts.

:func:`na2d` takes what ``natten.functional.na2d`` (0.21) takes -- heads-last ``[B, X, Y, H, D]``
query, key and value, NATTEN's clamp border, per-axis pairs of equal values -- and returns the
same ``[B, X, Y, H, D]``, plus what NATTEN's fused kernels do not offer: a trainable relative
position bias ``rpb`` (NATTEN <= 0.17's ``natten2dqkrpb``), every gradient, and the CPU backward.

Layouts: :func:`dcal.ops.neighborhood_attention2d` reads ``[B, H, X, Y, D]`` (``layout="heads_first"``,
the default) or ``[B, X, Y, H, D]`` (``layout="heads_last"``). Both run on the same kernels through
permuted views (no copy in, none out): the op takes any strides and writes its output in q's dim
order, so a heads-last q gives a dense heads-last output.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

from torch import Tensor

from dcal.ops import _validate as V

__all__ = ["na2d", "LAYOUTS"]

LAYOUTS = ("heads_first", "heads_last")

IntPair = Union[int, Tuple[int, int]]


def one_value(name: str, value):
    """NATTEN takes an int or a per-axis pair; the kernels take one value for both axes (the
    module :class:`dcal.nn.NeighborhoodAttention2D` reads its NATTEN-style arguments with it too)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"{name} must be an int or a pair of equal values (one value for both axes), got {value!r}"
            )
        value = value[0]
    return value


def _heads_last_tensor(name: str, t, ref: Optional[Tensor] = None) -> None:
    V.tensor(name, t, 5, "[B, X, Y, H, D] (heads last, NATTEN's layout)")
    if ref is not None and t.shape != ref.shape:
        what = ""
        if t.shape[:3] == ref.shape[:3] and t.shape[3] != ref.shape[3]:
            what = " (heads differ: grouped/multi-query attention is not supported; repeat k and v over heads)"
        elif t.shape[:4] == ref.shape[:4]:
            what = " (head dims differ: the op needs one head dim for q, k and v)"
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected the shape of query {tuple(ref.shape)} [B, X, Y, H, D]{what}"
        )


def na2d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    dilation: IntPair = 1,
    is_causal: Union[bool, Tuple[bool, bool]] = False,
    scale: Optional[float] = None,
    rpb: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """2-D neighborhood attention with ``natten.functional.na2d``'s signature and semantics.

    Args:
        query, key, value: heads-last ``[B, X, Y, H, D]`` (any strides; views are read in place).
        kernel_size: odd window size >= 3, or a pair of equal ones; needs
            ``kernel_size * dilation <= X, Y`` (NATTEN's rule).
        stride: only 1 (NATTEN's default); anything else raises.
        dilation: window step (an int or a pair of equal ints); NATTEN's dilated clamp rule.
        is_causal: only False (or ``(False, False)``); True raises (causal neighborhoods are not
            implemented).
        scale: logit scale, default ``D ** -0.5``.
        rpb: optional relative position bias ``[H, 2*kernel_size-1, 2*kernel_size-1]`` (NATTEN <=
            0.17's ``rpb``, indexed by ``(key - query) / dilation + kernel_size - 1``); trainable.
        backend: a dcal backend (``"triton"``, ``"cpp"``, ``"reference"``) or None.

    Returns ``[B, X, Y, H, D]`` in query's dtype: NATTEN's clamp neighborhood attention (every query
    sees exactly kernel_size**2 keys; the window shifts inside the map at the border). For a
    heads-last query laid out densely the output is dense heads-last too; nothing is copied.

    Arguments after ``kernel_size`` are keyword-only: NATTEN's fifth positional argument is
    ``stride``, so a positional call could otherwise read one for another. NATTEN's
    ``additional_keys``/``additional_values``, tile shapes and ``return_lse`` are not taken.
    """
    _heads_last_tensor("query", query)
    _heads_last_tensor("key", key, query)
    _heads_last_tensor("value", value, query)
    ks = one_value("kernel_size", kernel_size)
    if isinstance(ks, bool) or not isinstance(ks, int):
        raise TypeError(f"kernel_size must be an odd int >= 3 or a pair of equal ones, got {kernel_size!r}")
    st = one_value("stride", stride)
    if st != 1:
        raise ValueError(f"stride={stride!r} is not supported (only 1, NATTEN's default)")
    causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal,)
    if any(c is not False and c != 0 for c in causal):
        raise ValueError(
            f"is_causal={is_causal!r} is not supported: causal neighborhood attention is not "
            "implemented (only is_causal=False)"
        )
    dil = one_value("dilation", dilation)
    from dcal.ops import neighborhood_attention2d

    return neighborhood_attention2d(
        query,
        key,
        value,
        kernel_size=ks,
        border="clamp",
        rpb=rpb,
        scale=scale,
        dilation=dil,
        backend=backend,
        layout="heads_last",
    )


# ----------------------------------------------------------------------------- layouts


def to_heads_first(q: Tensor, k: Tensor, v: Tensor, layout: Optional[str], kernel_size, dilation):
    """(q, k, v) as ``[B, H, X, Y, D]`` views and whether the output must go back to heads-last.

    ``layout=None`` means ``"heads_first"`` plus a check for the common mistake of passing
    NATTEN's heads-last tensors without saying so: read as heads-first, a heads-last tensor has
    the heads as its map width. When that "width" is smaller than the window while the "heads"
    axis is not, a :class:`UserWarning` says so (pass ``layout`` explicitly to silence it). The
    check cannot see the mistake when the heads axis is at least as long as the window.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None (heads_first), got {layout!r}")
    if layout == "heads_last":
        for name, t in (("q", q), ("k", k), ("v", v)):
            V.tensor(name, t, 5, "[B, X, Y, H, D] (layout='heads_last')")
        return q.permute(0, 3, 1, 2, 4), k.permute(0, 3, 1, 2, 4), v.permute(0, 3, 1, 2, 4), True
    if layout is None and isinstance(q, Tensor) and q.dim() == 5:
        window = _window(kernel_size, dilation)
        if window is not None and q.shape[3] < window <= q.shape[1]:
            warnings.warn(
                f"q of shape {tuple(q.shape)} is read as heads-first [B, H, X, Y, D]: {q.shape[1]} heads on a "
                f"{q.shape[2]}x{q.shape[3]} map narrower than the {window}-wide window. If it is NATTEN's "
                "heads-last [B, X, Y, H, D], pass layout='heads_last' (or use dcal.ops.na2d); pass "
                "layout='heads_first' to silence this warning.",
                UserWarning,
                stacklevel=3,
            )
    return q, k, v, False


def _window(kernel_size, dilation) -> Optional[int]:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        return None
    if isinstance(dilation, bool) or not isinstance(dilation, int):
        return None
    return kernel_size * dilation


def to_layout(out: Tensor, heads_last: bool) -> Tensor:
    """The op's ``[B, H, X, Y, D]`` output back in the caller's layout (a permuted view)."""
    return out.permute(0, 2, 3, 1, 4) if heads_last else out
