"""What the Triton kernel files share: constants, the border codes, the dtype map, launch choices.

One home for each of them: ``LOG2E``/``LN2`` (the kernels run their softmax on exp2), the
neighborhood-attention border modes (:class:`Border`, whose codes are the C++ ``dcal::BorderMode``
values in ``csrc/dcal.h``), the torch -> Triton dtype names (:data:`TRITON_DTYPES`), the padded
head dim (:func:`block_d`) and :class:`Launch`, the one type every launcher (pwca, na2d, rollout)
describes a kernel launch with.

Torch and the standard library only, no Triton: ``dcal.ops`` reads the border names and the dtype
list from here without loading Triton (which ``import dcal`` must not do). Inside ``@triton.jit``
code the same values are ``tl.constexpr`` globals of :mod:`dcal.kernels._constexpr`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, Optional, Tuple

import torch

LOG2E = 1.4426950408889634  # log2(e): logits are prescaled by it so the softmax runs on exp2
LN2 = 0.6931471805599453  # ln(2): a log2-unit logsumexp times LN2 is the natural-log statistic


class Border(enum.IntEnum):
    """Border modes of neighborhood attention and the integer codes the kernels take (Triton and
    the C++/CUDA ops alike: the values of ``dcal::BorderMode``)."""

    ZERO = 0  # off-map window positions are zero keys/values that stay in the softmax
    MASK = 1  # off-map positions are left out of the softmax
    CLAMP = 2  # the window is shifted inside the map (NATTEN)


BORDER_CODES: Dict[str, int] = {b.name.lower(): int(b) for b in Border}  # name -> code
BORDERS: Tuple[str, ...] = tuple(BORDER_CODES)  # the names, in code order: zero, mask, clamp


def border_code(border: str) -> int:
    """The integer code of border mode ``border`` (one of :data:`BORDERS`)."""
    if border not in BORDER_CODES:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    return BORDER_CODES[border]


# dtypes the Triton kernels take, with their Triton names (pointer types of the AOT signatures)
TRITON_DTYPES: Dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

BLOCK_DS: Tuple[int, ...] = (16, 32, 64, 128)  # every padded head dim the kernels are built for


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16): the kernels' BLOCK_D."""
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """How one kernel is launched: its block-size constexprs and Triton's ``num_warps`` and
    ``num_stages``.

    Block sizes a kernel does not take stay None. ``block_m``/``block_n``: rows of the program's
    own block and of the blocks its inner loop walks (queries and keys in pwca and rollout; the
    rows of a pre-pass); ``tile_x``/``tile_y``: the 2-D query or key tile of a neighborhood
    program. ``launch["TILE_X"]``, ``launch["num_warps"]``: the launch's keyword arguments by the
    names the kernels and Triton give them (:meth:`kwargs`).
    """

    block_m: Optional[int] = None
    block_n: Optional[int] = None
    tile_x: Optional[int] = None
    tile_y: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2

    _BLOCKS = ("block_m", "block_n", "tile_x", "tile_y")

    def constexprs(self) -> Dict[str, int]:
        """The block sizes this launch sets, by their kernel argument names (``BLOCK_M``...)."""
        return {n.upper(): getattr(self, n) for n in self._BLOCKS if getattr(self, n) is not None}

    def options(self) -> Dict[str, int]:
        """``num_warps`` and ``num_stages``: Triton's launch (and compile) options."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def kwargs(self) -> Dict[str, int]:
        """Everything a launch passes by keyword: :meth:`constexprs` and :meth:`options`."""
        return {**self.constexprs(), **self.options()}

    def __getitem__(self, name: str) -> int:
        kw = self.kwargs()
        if name not in kw:
            raise KeyError(f"{name!r}: this launch sets {', '.join(kw)}")
        return kw[name]
