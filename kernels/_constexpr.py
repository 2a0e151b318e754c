"""The shared constants of :mod:`dcal.kernels._common` as ``tl.constexpr`` globals, the form
``@triton.jit`` code may read (the interpreter and the ahead-of-time compiler alike)."""

import triton.language as tl

from . import _common as C

LOG2E = tl.constexpr(C.LOG2E)
LN2 = tl.constexpr(C.LN2)

# neighborhood-attention border codes (the runtime ``border`` argument of the na2d kernels)
BORDER_ZERO = tl.constexpr(int(C.Border.ZERO))
BORDER_MASK = tl.constexpr(int(C.Border.MASK))
BORDER_CLAMP = tl.constexpr(int(C.Border.CLAMP))
