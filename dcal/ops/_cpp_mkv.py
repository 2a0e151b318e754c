"""The ``"cpp"`` backend of multi_kv_attention on CPU: ``dcal::mkv_fwd`` / ``dcal::mkv_bwd`` from
``csrc/mkv_cpu.cpp``, a FlashAttention-2 kernel over one or two key/value segments in one call.

The ops' schemas and CPU kernels are registered by the extension (``csrc/ops.cpp``); this module
adds the exact fake (meta) implementations and the autograd every multi_kv backend shares
(:func:`dcal.ops._autograd.register_mkv_autograd`): the backward is the ``dcal::mkv_bwd`` op. The lse gradient is folded into the kernel's delta.
"""

from __future__ import annotations

import torch

from dcal import _ext
from dcal.ops._autograd import register_mkv_autograd

_ext.require()  # an ImportError with build instructions; the dispatch chain reports it as the skip reason


def _segments(k1, v1, k2, v2):
    return [(k1, v1)] if k2 is None else [(k1, v1), (k2, v2)]


@torch.library.register_fake("dcal::mkv_fwd")
def _(q, k1, v1, k2, v2, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3])


@torch.library.register_fake("dcal::mkv_bwd")
def _(dout, dlse, q, k1, v1, k2, v2, out, lse, scale):
    res = [torch.empty_like(q, memory_format=torch.contiguous_format)]
    for k, v in _segments(k1, v1, k2, v2):
        res += [
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        ]
    return res


register_mkv_autograd("dcal::mkv_fwd", torch.ops.dcal.mkv_bwd, "cpp")


def mkv_cpp(q, k1, v1, k2, v2, scale):
    """Backend entry point (contract of :mod:`dcal.ops._dispatch`): (out, lse).

    float16 on CPU runs the float32 kernels on float32 copies of the inputs (linear memory) and
    casts the output (and, through autograd, the gradients) back to float16."""
    if q.dtype == torch.float16:
        c = lambda t: None if t is None else t.float()  # noqa: E731
        out, lse = torch.ops.dcal.mkv_fwd(c(q), c(k1), c(v1), c(k2), c(v2), float(scale))
        return out.half(), lse
    return torch.ops.dcal.mkv_fwd(q, k1, v1, k2, v2, float(scale))
