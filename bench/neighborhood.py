"""2-D neighborhood attention benchmark: the BEV local graph attention (docs/contract.md; docs/performance.md).

``python -m bench.neighborhood [--quick] [--device cpu|cuda] [...]`` (options: :mod:`bench.common`).

Inputs are what the BEV module has after its 1x1 qkv convolution: q, k, v [B, C, X, Y] with
C = heads * D. Providers:

* ``unfold``: the original code: ``F.unfold`` of k and v with padding ks // 2 ([B, heads, D, ks*ks,
  X*Y], ks*ks copies of the map), logits summed over D, softmax over the ks*ks window, weighted
  sum; zero-padding semantics (``border="zero"``; other borders: skipped).
* ``unfold_compiled``: ``torch.compile`` of ``unfold``.
* ``natten``: ``natten.na2d`` (NATTEN's own semantics, i.e. ``border="clamp"``; clamp cases only),
  forward only on CPU (NATTEN has no CPU backward); skipped when natten is not installed.
* ``flex``: compiled ``flex_attention`` with the block mask of the case's border (see
  :mod:`bench.flex`; ``zero`` through zero-padded keys/values), forward only on CPU.
* ``dcal``: ``dcal.ops.neighborhood_attention2d(border=<the case's>, backend="cpp")`` (CPU C++, or
  CUDA C++ on a GPU), including the [B, C, X, Y] <-> [B, H, X, Y, D] layout changes (views: the
  op reads the maps in place and returns its output and gradients in their dim order).
* ``dcal_window``: the same CPU op on its per-window kernels (the path bf16 took before it ran the
  SIMD kernels); bf16 cases on CPU only, where it is the baseline.

Cases (kernel 7, 4 heads, fp32 on CPU, fp16 on GPU): border ``zero`` at 128x128 with 128 channels
and at the BEV models' B 2, 256 channels, 256x256, forward and forward+backward, and border ``clamp``
(NATTEN's) forward at 64x64 with 128 channels, where NATTEN's CPU path finishes in seconds. On CPU
also bf16 at 128x128 with 128 channels, zero border, forward and forward+backward: ``dcal`` (the
SIMD kernels) against ``dcal_window`` (the per-window kernels) and ``unfold``.
``--full`` adds the sweep over maps 64 / 128 / 256 and channels 128 / 256 (batch 1), and clamp and
mask at 128x128. ``--quick``: 2 heads, 32 channels, maps 16 and 24. Memory floor: the output (+ the
three gradients for fwd+bwd).
"""

from __future__ import annotations

import sys

import torch

from bench.common import Case, Unavailable, bench_main, floor_outputs, flops_neighborhood
from dcal.testing.providers import unfold_na

NAME = "neighborhood"
BASELINE = "unfold"
X_LABEL = "map side (X = Y)"
FLOPS = "4*k*k*D per query and head forward (k = 7), 3.5x that for fwd+bwd"
KERNEL = 7
HEAVY_ELEMENTS = 2 * 256 * 256 * 256  # fwd+bwd at the BEV models' size: tens of seconds per call here


def _case(B, H, C, M, mode, device, dtype, border="zero"):
    shape = (B, C, M, M)
    tag = ("" if border == "zero" else f"-{border}") + ("-bf16" if dtype == "bfloat16" else "")
    return Case(
        name=f"B{B}-C{C}-{M}x{M}{tag}-{mode}",
        params=dict(B=B, H=H, C=C, X=M, Y=M, ks=KERNEL, border=border),
        dtype=dtype,
        device=device,
        mode=mode,
        flops=flops_neighborhood(B, H, M, M, KERNEL, C // H, mode),
        x=M,
        group=f"C{C} B{B} {border} {mode}" + (" bf16" if dtype == "bfloat16" else ""),
        floor_bytes=floor_outputs(shape, dtype, mode, [shape] * 3),
        heavy=(mode != "fwd" and B * C * M * M >= HEAVY_ELEMENTS and not device.startswith("cuda")),
        baseline="dcal_window" if dtype == "bfloat16" else "" if border == "zero" else "natten",
    )


def cases(quick: bool, device: str, full: bool = False):
    cuda = device.startswith("cuda")
    dtype = "float16" if cuda else "float32"
    if quick:
        grid, extra = [(1, 2, 32, 16), (1, 2, 32, 24)], [(1, 2, 32, 16, "clamp")]
    elif full:
        grid = [(1, 4, c, m) for c in (128, 256) for m in (64, 128, 256)] + [(2, 4, 256, 256)]
        extra = [(1, 4, 128, 64, "clamp"), (1, 4, 128, 128, "clamp"), (1, 4, 128, 128, "mask")]
    else:
        grid, extra = [(1, 4, 128, 128), (2, 4, 256, 256)], [(1, 4, 128, 64, "clamp")]
    out = [_case(B, H, C, M, mode, device, dtype) for mode in ("fwd", "fwd+bwd") for B, H, C, M in grid]
    out += [_case(B, H, C, M, "fwd", device, dtype, border) for B, H, C, M, border in extra]
    if not cuda and not quick:  # bf16 on the SIMD kernels against the per-window kernels
        out += [_case(1, 4, 128, 128, mode, device, "bfloat16") for mode in ("fwd", "fwd+bwd")]
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


def _heads(t, heads):
    """[B, C, X, Y] -> [B, H, X, Y, D] (a view)."""
    B, C, X, Y = t.shape
    return t.view(B, heads, C // heads, X, Y).permute(0, 1, 3, 4, 2)


def _channels(out, shape):
    """[B, H, X, Y, D] -> [B, C, X, Y]."""
    return out.permute(0, 1, 4, 2, 3).reshape(shape)


def dcal_na(q, k, v, heads: int, ks: int, border: str = "zero"):
    import dcal.ops

    out = dcal.ops.neighborhood_attention2d(
        _heads(q, heads), _heads(k, heads), _heads(v, heads), kernel_size=ks, border=border, backend="cpp"
    )
    return _channels(out, q.shape)


def _zero_only(case):
    if case.params.get("border", "zero") != "zero":
        raise Unavailable("the unfold code has zero-padding semantics only")


def _not_bf16(case):
    if case.dtype == "bfloat16":
        raise Unavailable("bf16 cases: dcal's two CPU paths and unfold only")


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
    _zero_only(case)
    return _step(case, inputs, unfold_na)


def unfold_compiled(case, inputs):
    _zero_only(case)
    _not_bf16(case)
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
    if case.params.get("border", "zero") != "clamp":
        raise Unavailable("NATTEN's window is the clamp border only")
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


def flex(case, inputs):
    from bench import flex as fx

    why = fx.unavailable_reason(case.device, case.mode)
    if why:
        raise Unavailable(why)
    _not_bf16(case)
    p = case.params
    border = p.get("border", "zero")
    bmask = fx.na_block_mask(p["X"], p["Y"], p["ks"], border, device=case.device)
    attend = fx.flex_fn(compiled=True)

    def flex_na(q, k, v, heads, ks):
        out = fx.flex_neighborhood(_heads(q, heads), _heads(k, heads), _heads(v, heads), ks, border, bmask, attend)
        return _channels(out, q.shape)

    return _step(case, inputs, flex_na)


def dcal(case, inputs):
    border = case.params.get("border", "zero")
    return _step(case, inputs, lambda q, k, v, heads, ks: dcal_na(q, k, v, heads, ks, border))


def dcal_window(case, inputs):
    if case.dtype != "bfloat16" or case.device != "cpu":
        raise Unavailable("the per-window kernels are the baseline of the bf16 cases on CPU only")
    from dcal.ops._cpp_na2d import _na2d_window

    border = case.params.get("border", "zero")

    def window_na(q, k, v, heads, ks):
        out = _na2d_window(_heads(q, heads), _heads(k, heads), _heads(v, heads), kernel_size=ks, border=border)
        return _channels(out, q.shape)

    return _step(case, inputs, window_na)


PROVIDERS = {
    "unfold": unfold,
    "unfold_compiled": unfold_compiled,
    "natten": natten,
    "flex": flex,
    "dcal": dcal,
    "dcal_window": dcal_window,
}


if __name__ == "__main__":
    bench_main(sys.modules[__name__])
