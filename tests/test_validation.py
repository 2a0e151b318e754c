"""Bad input: every public op rejects it before doing any work, with a ValueError/TypeError that
names the argument and what was expected."""

import pytest
import torch

from dcal import ops


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


Q4 = (1, 2, 5, 16)


def kv(n=3, **kw):
    return t(1, 2, n, 16, **kw), t(1, 2, n, 16, **kw)


CASES_MKV = [
    ("q-rank", lambda: ops.multi_kv_attention(t(2, 5, 16), [kv()]), ValueError, "q"),
    ("q-not-tensor", lambda: ops.multi_kv_attention([1.0], [kv()]), TypeError, "q"),
    ("q-int-dtype", lambda: ops.multi_kv_attention(torch.ones(Q4, dtype=torch.int64), [kv()]), TypeError, "q"),
    ("kv-empty", lambda: ops.multi_kv_attention(t(*Q4), []), ValueError, "kv"),
    ("kv-tensor", lambda: ops.multi_kv_attention(t(*Q4), t(*Q4)), TypeError, "kv"),
    ("kv-not-pair", lambda: ops.multi_kv_attention(t(*Q4), [(t(*Q4),)]), TypeError, "kv[0]"),
    ("k-rank", lambda: ops.multi_kv_attention(t(*Q4), [(t(2, 3, 16), t(1, 2, 3, 16))]), ValueError, "kv[0][0] (k)"),
    ("heads-mismatch", lambda: ops.multi_kv_attention(t(*Q4), [(t(1, 3, 3, 16), t(1, 3, 3, 16))]), ValueError, "heads"),
    ("batch-mismatch", lambda: ops.multi_kv_attention(t(*Q4), [(t(2, 2, 3, 16), t(2, 2, 3, 16))]), ValueError, "batch"),
    (
        "headdim-mismatch",
        lambda: ops.multi_kv_attention(t(*Q4), [(t(1, 2, 3, 8), t(1, 2, 3, 8))]),
        ValueError,
        "head dim",
    ),
    (
        "kv-length",
        lambda: ops.multi_kv_attention(t(*Q4), [(t(1, 2, 3, 16), t(1, 2, 4, 16))]),
        ValueError,
        "same length",
    ),
    ("mixed-dtype", lambda: ops.multi_kv_attention(t(*Q4), [kv(dtype=torch.float64)]), TypeError, "dtype"),
    (
        "mixed-device",
        lambda: ops.multi_kv_attention(t(*Q4), [(t(1, 2, 3, 16).to("meta"), t(1, 2, 3, 16))]),
        ValueError,
        "kv[0][0] (k)",
    ),
    ("scale-type", lambda: ops.multi_kv_attention(t(*Q4), [kv()], scale="x"), TypeError, "scale"),
    ("backend-unknown", lambda: ops.multi_kv_attention(t(*Q4), [kv()], backend="cuda"), ValueError, "backend"),
    (
        "pwca-v2-length",
        lambda: ops.pwca_attention(t(*Q4), *kv(), t(1, 2, 3, 16), t(1, 2, 2, 16)),
        ValueError,
        "kv[1][1] (v)",
    ),
]

X5 = (1, 2, 6, 7, 16)
CASES_NA = [
    ("q-rank", lambda: ops.neighborhood_attention2d(t(1, 6, 7, 16), t(*X5), t(*X5)), ValueError, "q"),
    ("k-shape", lambda: ops.neighborhood_attention2d(t(*X5), t(1, 2, 6, 8, 16), t(*X5)), ValueError, "k"),
    ("v-shape", lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(1, 2, 6, 7, 8)), ValueError, "v"),
    ("v-dtype", lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5, dtype=torch.float64)), TypeError, "v"),
    ("k-device", lambda: ops.neighborhood_attention2d(t(*X5), t(*X5).to("meta"), t(*X5)), ValueError, "k"),
    ("ks-even", lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=4), ValueError, "kernel_size"),
    (
        "ks-small",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=1),
        ValueError,
        "kernel_size",
    ),
    (
        "ks-float",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=7.0),
        TypeError,
        "kernel_size",
    ),
    ("border", lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), border="reflect"), ValueError, "border"),
    (
        "clamp-small-map",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=7, border="clamp"),
        ValueError,
        "clamp",
    ),
    (
        "rpb-shape",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=3, rpb=t(2, 3, 3)),
        ValueError,
        "rpb",
    ),
    (
        "rpb-heads",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=3, rpb=t(3, 5, 5)),
        ValueError,
        "rpb",
    ),
    (
        "rpb-dtype",
        lambda: ops.neighborhood_attention2d(
            t(*X5), t(*X5), t(*X5), kernel_size=3, rpb=t(2, 5, 5, dtype=torch.float64)
        ),
        TypeError,
        "rpb",
    ),
    (
        "backend-unknown",
        lambda: ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), backend="natten"),
        ValueError,
        "backend",
    ),
]

CASES_ROLLOUT = [
    ("qs-tensor", lambda: ops.attention_rollout(t(*Q4), [t(*Q4)]), TypeError, "qs"),
    ("qs-empty", lambda: ops.attention_rollout([], []), ValueError, "qs"),
    ("count", lambda: ops.attention_rollout([t(*Q4)] * 2, [t(*Q4)]), ValueError, "ks"),
    ("shape", lambda: ops.attention_rollout([t(*Q4), t(1, 2, 6, 16)], [t(*Q4)] * 2), ValueError, "qs[1]"),
    ("k-dtype", lambda: ops.attention_rollout([t(*Q4)], [t(*Q4, dtype=torch.float64)]), TypeError, "ks[0]"),
    ("lses-shape", lambda: ops.attention_rollout([t(*Q4)], [t(*Q4)], lses=[t(1, 2, 4)]), ValueError, "lses[0]"),
    ("residual", lambda: ops.attention_rollout([t(*Q4)], [t(*Q4)], residual=1.5), ValueError, "residual"),
    ("backend-unknown", lambda: ops.attention_rollout([t(*Q4)], [t(*Q4)], backend="fast"), ValueError, "backend"),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize(
    "name,call,exc,needle",
    CASES_MKV + CASES_NA + CASES_ROLLOUT,
    ids=["mkv-" + i for i in _ids(CASES_MKV)]
    + ["na-" + i for i in _ids(CASES_NA)]
    + ["rollout-" + i for i in _ids(CASES_ROLLOUT)],
)
def test_bad_input_raises_naming_argument(name, call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value), f"message does not name {needle!r}: {info.value}"


def test_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match="cannot run .*sdpa|sdpa.*does not implement"):
        ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=3, backend="sdpa")


def test_validation_happens_before_any_backend(monkeypatch):
    """A bad call never reaches a backend implementation."""
    from dcal.ops import _dispatch

    def boom(*a, **k):
        raise AssertionError("backend chosen before validation")

    monkeypatch.setattr(_dispatch, "choose", boom)
    monkeypatch.setattr(ops, "choose", boom)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.neighborhood_attention2d(t(*X5), t(*X5), t(*X5), kernel_size=6)
    with pytest.raises(ValueError, match="same length"):
        ops.pwca_attention(t(*Q4), *kv(), t(1, 2, 3, 16), t(1, 2, 4, 16))
