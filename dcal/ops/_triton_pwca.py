"""The ``"triton"`` backend of multi_kv_attention / pwca_attention: custom ops around the kernels
of :mod:`dcal.kernels.pwca`.

``dcal::pwca_fwd_triton`` -> (out, lse) and ``dcal::pwca_bwd_triton`` -> [dq, dk1, dv1(, dk2, dv2)]
are ``torch.library.triton_op``s whose kernel launches go through ``wrap_triton``, so
``torch.compile`` sees the kernels; a triton_op's body doubles as its fake implementation (it is
traceable: it only allocates and launches). Under ``TRITON_INTERPRET=1`` the kernels are
interpreted Python that cannot run on fake tensors, so there the same bodies are registered as
plain ``custom_op``s with an explicit fake; that is what lets CPU tests run ``opcheck`` and
autograd through the same launchers. The backward is its own op; autograd saves only the inputs,
the output and the fp32 logsumexp, and nothing when no input needs a gradient.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from dcal.ops._autograd import register_mkv_autograd

from dcal.kernels.pwca import pwca_bwd, pwca_fwd

# (read here, not through dcal.ops._dispatch, which imports this module on first use)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _define(name):
    if _INTERPRET:
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


@_define("dcal::pwca_fwd_triton")
def pwca_fwd_triton(
    q: Tensor, k1: Tensor, v1: Tensor, k2: Optional[Tensor], v2: Optional[Tensor], scale: float
) -> Tuple[Tensor, Tensor]:
    return pwca_fwd(q, k1, v1, k2, v2, scale)


@_define("dcal::pwca_bwd_triton")
def pwca_bwd_triton(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Optional[Tensor],
    v2: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> List[Tensor]:
    return [g for g in pwca_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale) if g is not None]


if _INTERPRET:

    @pwca_fwd_triton.register_fake
    def _(q, k1, v1, k2, v2, scale):
        B, H, NQ, D = q.shape
        return q.new_empty((B, H, NQ, D)), q.new_empty((B, H, NQ), dtype=torch.float32)

    @pwca_bwd_triton.register_fake
    def _(dout, dlse, q, k1, v1, k2, v2, out, lse, scale):
        res = [q.new_empty(q.shape)]
        for k, v in ((k1, v1), (k2, v2)):
            if k is not None:
                res += [k.new_empty(k.shape), v.new_empty(v.shape)]
        return res


register_mkv_autograd(pwca_fwd_triton, pwca_bwd_triton, "triton")


def mkv_triton(q, k1, v1, k2, v2, scale):
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`): (out, lse)."""
    return pwca_fwd_triton(q, k1, v1, k2, v2, float(scale))
