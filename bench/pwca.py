"""PWCA benchmark: queries of one image over the keys/values of two (docs/contract.md; docs/performance.md).

``python -m bench.pwca [--quick] [--device cpu|cuda] [...]`` (options: :mod:`bench.common`).

Providers (all exact attention of ``q`` over ``cat(k1, k2)``, ``cat(v1, v2)``):

* ``naive``: the original code: ``softmax(q @ cat(k)^T * scale) @ cat(v)``, the [B, H, N, 2N] score
  matrix in memory (and, for the backward, the probabilities too).
* ``sdpa_cat``: ``F.scaled_dot_product_attention`` over ``torch.cat`` of the keys and values.
* ``sdpa_merge``: ``dcal.ops.pwca_attention(..., backend="sdpa")``: one fused SDPA per segment,
  merged through the logsumexps (no concatenation).
* ``compiled``: ``torch.compile`` of ``naive`` (an ``error:`` row if compile fails here).
* ``flex``: compiled ``torch.nn.attention.flex_attention`` over the concatenated keys/values
  (no mask; forward only on CPU, where PyTorch has no flex backward).
* ``dcal``: ``dcal.ops.pwca_attention`` with the default backend chain (Triton on GPU; on CPU the
  first of ``cpp``/``sdpa`` that can run; the chosen one is printed first).

Cases: DCAL's shape (12 heads, D 64, batch 8 on GPU, 2 on CPU; 785 queries over 785 + 785
keys at 448 px), forward and forward+backward, fp32 on CPU, fp16 on GPU; ``--full`` sweeps the
tokens over 197 / 577 / 785 / 1025 (224 / 384 / 448 / 512 px, ViT patch 16 + CLS). ``--quick``:
2 heads, D 32, tokens 33 and 65. Memory floor: the output (+ the five gradients for fwd+bwd).
"""

from __future__ import annotations

import sys

import torch

from bench.common import Case, Unavailable, bench_main, floor_outputs, flops_attention
from dcal.testing.providers import naive_pwca, sdpa_cat_pwca, step

NAME = "pwca"
BASELINE = "sdpa_cat"
X_LABEL = "tokens per image N (keys: 2N)"
FLOPS = "4*Nq*Nk*D per head forward (Nk = 2N), 3.5x that for fwd+bwd (backward 2.5x)"

# (tokens, image side in px) of ViT-B/16: (side / 16) ** 2 patches + CLS.
SWEEP = ((197, 224), (577, 384), (785, 448), (1025, 512))
SEEDS = ((785, 448),)
QUICK = ((33, 80), (65, 128))


def cases(quick: bool, device: str, full: bool = False):
    cuda = device.startswith("cuda")
    if quick:
        B, H, D, sweep = 1, 2, 32, QUICK
    else:
        B, H, D, sweep = (8 if cuda else 2), 12, 64, (SWEEP if full else SEEDS)
    dtype = "float16" if cuda else "float32"
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for n, px in sweep:
            shape = (B, H, n, D)
            out.append(
                Case(
                    name=f"N{n}-{mode}",
                    params=dict(B=B, H=H, N=n, D=D, px=px),
                    dtype=dtype,
                    device=device,
                    mode=mode,
                    flops=flops_attention(B, H, n, 2 * n, D, mode),
                    x=n,
                    group=mode,
                    floor_bytes=floor_outputs(shape, dtype, mode, [shape] * 5),
                )
            )
    return out


def describe(device: str) -> str:
    """Which backend the ``dcal`` provider runs here, and why the others were skipped."""
    import dcal.ops

    q = torch.empty(1, 1, 1, 64, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    return dcal.ops.explain("pwca_attention", q)


def make_inputs(case: Case):
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (p["B"], p["H"], p["N"], p["D"])
    grad = case.mode != "fwd"

    def t():
        x = torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype())
        return x.requires_grad_(grad)

    q, k1, v1, k2, v2 = (t() for _ in range(5))
    dout = torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype()) if grad else None
    return q, k1, v1, k2, v2, dout


def _step(case: Case, inputs, fn):
    """The timed callable: forward only (no graph) or forward + backward to all five inputs."""
    q, k1, v1, k2, v2, dout = inputs
    return step(fn, (q, k1, v1, k2, v2), None if case.mode == "fwd" else dout)


def naive(case, inputs):
    return _step(case, inputs, naive_pwca)


def sdpa_cat(case, inputs):
    return _step(case, inputs, sdpa_cat_pwca)


def sdpa_merge(case, inputs):
    import dcal.ops

    return _step(case, inputs, lambda *a: dcal.ops.pwca_attention(*a, backend="sdpa"))


def compiled(case, inputs):
    try:
        fn = torch.compile(naive_pwca, dynamic=False)
    except Exception as e:  # e.g. no compiler for this platform
        raise Unavailable(f"torch.compile unavailable: {type(e).__name__}: {e}")
    return _step(case, inputs, fn)


def flex(case, inputs):
    from bench import flex as fx

    why = fx.unavailable_reason(case.device, case.mode)
    if why:
        raise Unavailable(why)
    attend = fx.flex_fn(compiled=True)
    return _step(case, inputs, lambda *a: fx.flex_concat(*a, attend=attend))


def dcal_default(case, inputs):
    import dcal.ops

    return _step(case, inputs, lambda *a: dcal.ops.pwca_attention(*a))


PROVIDERS = {
    "naive": naive,
    "sdpa_cat": sdpa_cat,
    "sdpa_merge": sdpa_merge,
    "compiled": compiled,
    "flex": flex,
    "dcal": dcal_default,
}


if __name__ == "__main__":
    bench_main(sys.modules[__name__])
