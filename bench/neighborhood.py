"""2-D neighborhood attention benchmark: the BEV local graph attention (DESIGN 3.4, 9).

``python -m bench.neighborhood [--quick] [--device cpu|cuda] [...]`` (options: :mod:`bench.common`).

Inputs are what the BEV module has after its 1x1 qkv convolution: q, k, v [B, C, X, Y] with
C = heads * D. Providers:

* ``unfold``: the seeds' code: ``F.unfold`` of k and v with padding ks // 2 ([B, heads, D, ks*ks,
  X*Y], ks*ks copies of the map), logits summed over D, softmax over the ks*ks window, weighted
  sum; zero-padding semantics (``border="zero"``).
* ``unfold_compiled``: ``torch.compile`` of ``unfold``.
* ``natten``: ``natten.na2d`` (NATTEN's own semantics, i.e. ``border="clamp"``), forward only on
  CPU (NATTEN has no CPU backward); skipped when natten is not installed.
* ``dcal``: ``dcal.ops.neighborhood_attention2d(border="zero", backend="cpp")`` (CPU C++, or
  CUDA C++ on a GPU), including the [B, C, X, Y] <-> [B, H, X, Y, D] layout changes.

Cases: kernel 7, 4 heads, maps 64 / 128 / 256, channels 128 / 256, batch 1, fp32 on CPU (fp16 on
GPU), forward and forward+backward; plus the batch-2 seeds' shape (256x256, 256 channels).
``--quick``: 2 heads, 32 channels, maps 16 and 24. The FLOP count is that of exact attention of
each pixel over its ks*ks keys (logits and weighted sum; backward 2.5x).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import Case, Unavailable, bench_main, flops_attention

NAME = "neighborhood"
BASELINE = "unfold"
X_LABEL = "map side (X = Y)"
KERNEL = 7


def cases(quick: bool, device: str):
    cuda = device.startswith("cuda")
    dtype = "float16" if cuda else "float32"
    if quick:
        grid = [(1, 2, 32, 16), (1, 2, 32, 24)]
    else:
        grid = [(1, 4, c, m) for c in (128, 256) for m in (64, 128, 256)] + [(2, 4, 256, 256)]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for B, H, C, M in grid:
            out.append(Case(
                name=f"B{B}-C{C}-{M}x{M}-{mode}", params=dict(B=B, H=H, C=C, X=M, Y=M, ks=KERNEL), dtype=dtype,
                device=device, mode=mode, flops=flops_attention(B, H, M * M, KERNEL * KERNEL, C // H, mode), x=M,
                group=f"C{C} B{B} {mode}"))
    return out


def describe(device: str) -> str:
    import dcal.ops

    q = torch.empty(1, 1, 1, 1, 32, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    return dcal.ops.explain("neighborhood_attention2d", q)


def make_inputs(case: Case):
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (p["B"], p["C"], p["X"], p["Y"])
    grad = case.mode != "fwd"

    def t():
        return torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype()).requires_grad_(grad)

    q, k, v = t(), t(), t()
    dout = torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype()) if grad else None
    return q, k, v, dout


def unfold_na(q, k, v, heads: int, ks: int):
    """The seeds' local attention: [B, C, X, Y] in and out, zero padding at the border."""
    B, C, X, Y = q.shape
    D = C // heads
    kk = F.unfold(k, ks, padding=ks // 2).view(B, heads, D, ks * ks, X * Y)
    vv = F.unfold(v, ks, padding=ks // 2).view(B, heads, D, ks * ks, X * Y)
    qq = q.reshape(B, heads, D, 1, X * Y)
    attn = (qq * kk).sum(dim=2, keepdim=True) * D ** -0.5  # [B, heads, 1, ks*ks, X*Y]
    attn = attn.softmax(dim=3)
    out = (attn * vv).sum(dim=3)  # [B, heads, D, X*Y]
    return out.reshape(B, C, X, Y)


def _heads(t, heads):
    """[B, C, X, Y] -> [B, H, X, Y, D] (a view)."""
    B, C, X, Y = t.shape
    return t.view(B, heads, C // heads, X, Y).permute(0, 1, 3, 4, 2)


def dcal_na(q, k, v, heads: int, ks: int):
    import dcal.ops

    out = dcal.ops.neighborhood_attention2d(
        _heads(q, heads), _heads(k, heads), _heads(v, heads), kernel_size=ks, border="zero", backend="cpp")
    B, C, X, Y = q.shape
    return out.permute(0, 1, 4, 2, 3).reshape(B, C, X, Y)


def _step(case: Case, inputs, fn):
    q, k, v, dout = inputs
    heads, ks = case.params["H"], case.params["ks"]
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, heads, ks)
    else:
        def run():
            out = fn(q, k, v, heads, ks)
            return torch.autograd.grad(out, (q, k, v), dout)
    return run


def unfold(case, inputs):
    return _step(case, inputs, unfold_na)


def unfold_compiled(case, inputs):
    try:
        fn = torch.compile(unfold_na, dynamic=False)
    except Exception as e:
        raise Unavailable(f"torch.compile unavailable: {type(e).__name__}: {e}")
    return _step(case, inputs, fn)


def natten(case, inputs):
    try:
        import natten as nat
    except ImportError:
        raise Unavailable("natten is not installed (pip install --no-build-isolation natten)")
    if case.mode != "fwd" and not case.device.startswith("cuda"):
        raise Unavailable("NATTEN has no CPU backward")

    def natten_na(q, k, v, heads, ks):
        def heads_last(t):  # [B, C, X, Y] -> [B, X, Y, H, D]
            B, C, X, Y = t.shape
            return t.view(B, heads, C // heads, X, Y).permute(0, 3, 4, 1, 2)
        out = nat.na2d(heads_last(q), heads_last(k), heads_last(v), kernel_size=ks)
        B, C, X, Y = q.shape
        return out.permute(0, 3, 4, 1, 2).reshape(B, C, X, Y)

    return _step(case, inputs, natten_na)


def dcal(case, inputs):
    return _step(case, inputs, dcal_na)


PROVIDERS = {"unfold": unfold, "unfold_compiled": unfold_compiled, "natten": natten, "dcal": dcal}


if __name__ == "__main__":
    bench_main(sys.modules[__name__])
