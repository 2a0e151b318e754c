"""The reference ops under the backend implementation contracts of :mod:`dcal.ops._dispatch`."""
from dcal.ops import reference


def mkv_reference(q, k1, v1, k2, v2, scale):
    kv = [(k1, v1)] if k2 is None else [(k1, v1), (k2, v2)]
    return reference.multi_kv_attention(q, kv, scale=scale, return_lse=True)


def na2d_reference(q, k, v, rpb, kernel_size, border, scale, dilation=1):
    return reference.neighborhood_attention2d(q, k, v, kernel_size=kernel_size, border=border, rpb=rpb, scale=scale,
                                              dilation=dilation)


def rollout_reference(qs, ks, lses, scale, residual):
    return reference.attention_rollout(qs, ks, scale=scale, lses=lses, residual=residual)
