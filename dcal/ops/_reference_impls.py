"""The reference ops under the backend implementation contracts of :mod:`dcal.ops._dispatch`."""

from dcal.kernels._layout import empty_in_order_of
from dcal.ops import reference


def mkv_reference(q, k1, v1, k2, v2, scale):
    kv = [(k1, v1)] if k2 is None else [(k1, v1), (k2, v2)]
    return reference.multi_kv_attention(q, kv, scale=scale, return_lse=True)


def na2d_reference(q, k, v, rpb, kernel_size, border, scale, dilation=1):
    out = reference.neighborhood_attention2d(
        q, k, v, kernel_size=kernel_size, border=border, rpb=rpb, scale=scale, dilation=dilation
    )
    # in q's dim order, as every other backend returns it (the copy is differentiable)
    want = empty_in_order_of(q, dtype=out.dtype)
    return out if want.stride() == out.stride() else want.copy_(out)


def rollout_reference(qs, ks, lses, scale, residual):
    return reference.attention_rollout(qs, ks, scale=scale, lses=lses, residual=residual)
