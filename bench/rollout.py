"""Attention rollout benchmark (docs/contract.md; docs/performance.md): the CLS row of S_L @ ... @ S_1 over L SA blocks.

``python -m bench.rollout [--quick] [--device cpu|cuda] [...]`` (options: :mod:`bench.common`).

Providers (all exact; inputs are the L blocks' q and k, plus their logsumexps for ``*_lse``):

* ``original``: what the original DCAL code's GLCA does: every block's head-mean attention map [B, N, N] is kept, then
  the maps are multiplied (L maps of N x N in memory at once).
* ``reference``: ``dcal.ops.reference.attention_rollout``: dense, one [B, H, N, N] score tensor and
  the running [B, N, N] product at a time (the baseline).
* ``compiled``: ``torch.compile`` of ``reference``.
* ``cpp``: ``dcal.ops.attention_rollout(backend="cpp")``, logsumexps recomputed from the same
  score tiles (one pass); ``cpp_lse``: the same with the blocks' logsumexps given.
* ``triton`` / ``triton_lse``: the Triton backend (CUDA only).

FLOPs counted per call (:data:`FLOPS`): ``2 * N^2 * D`` per head and block for the scores, with or
without the logsumexps (they come from the same scores), so GFLOP/s compares the same useful work;
the dense providers' ``2 * B * N^3`` per block for the matrix product is not counted. Memory floor: the [B, N] fp32 output.

Cases: ViT-B/16 (12 blocks, 12 heads, D 64, batch 2) at 448 px (785 tokens, DCAL's shape);
``--full`` adds 224 px (197 tokens); fp32 on CPU, fp16 on GPU. ``--quick``: 3 blocks, 2 heads,
D 32, tokens 33 and 65. After the table the script checks the memory target (docs/performance.md) at the ViT's shape: the
fused rollout's extra memory at most 1/20 of the dense reference's.
"""

from __future__ import annotations

import sys

import torch

from bench.common import Case, Unavailable, bench_main, flops_rollout, nbytes
from dcal.testing.providers import original_rollout

NAME = "rollout"
BASELINE = "reference"
X_LABEL = "tokens N"
FLOPS = "2*N*N*D per head and block (the scores), with or without the logsumexps"

SWEEP = (197, 785)
SEEDS = (785,)
QUICK = (33, 65)
GOAL_CASE, GOAL_RATIO = "N785", 1 / 20


def cases(quick: bool, device: str, full: bool = False):
    cuda = device.startswith("cuda")
    if quick:
        B, H, D, L, sweep = 1, 2, 32, 3, QUICK
    else:
        B, H, D, L, sweep = 2, 12, 64, 12, (SWEEP if full else SEEDS)
    dtype = "float16" if cuda else "float32"
    return [
        Case(
            name=f"N{n}-L{L}",
            params=dict(B=B, H=H, N=n, D=D, L=L),
            dtype=dtype,
            device=device,
            mode="fwd",
            flops=flops_rollout(B, H, n, D, L),
            x=n,
            group="fwd",
            floor_bytes=nbytes((B, n), "float32"),
        )
        for n in sweep
    ]


def describe(device: str) -> str:
    import dcal.ops

    q = torch.empty(1, 1, 1, 64, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    return dcal.ops.explain("attention_rollout", q)


def make_inputs(case: Case):
    """q, k of every block and their logsumexps (an SA forward returns those; counted as inputs)."""
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (p["B"], p["H"], p["N"], p["D"])
    scale = p["D"] ** -0.5
    qs, ks, lses = [], [], []
    for _ in range(p["L"]):
        q = torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype())
        k = torch.randn(shape, generator=g).to(device=case.device, dtype=case.torch_dtype())
        # One head at a time: the benchmark's own setup must not hold a [B, H, N, N] tensor.
        lse = torch.stack(
            [torch.logsumexp((q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * scale, -1) for h in range(p["H"])],
            dim=1,
        )
        qs.append(q), ks.append(k), lses.append(lse)
    return qs, ks, lses


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def original(case, inputs):
    qs, ks, _ = inputs
    return _no_grad(lambda: original_rollout(qs, ks))


def reference(case, inputs):
    from dcal.ops import reference as ref

    qs, ks, _ = inputs
    return _no_grad(lambda: ref.attention_rollout(qs, ks))


def compiled(case, inputs):
    from dcal.ops import reference as ref

    qs, ks, _ = inputs
    try:
        fn = torch.compile(lambda a, b: ref.attention_rollout(a, b), dynamic=False)
    except Exception as e:  # e.g. no compiler for this platform
        raise Unavailable(f"torch.compile unavailable: {type(e).__name__}: {e}")
    return _no_grad(lambda: fn(qs, ks))


def _fused(backend: str, with_lse: bool):
    def provider(case, inputs):
        import dcal.ops

        qs, ks, lses = inputs
        try:
            dcal.ops.chosen_backend("attention_rollout", qs[0], backend=backend)
        except ValueError as e:
            raise Unavailable(str(e))
        lse_arg = lses if with_lse else None
        return lambda: dcal.ops.attention_rollout(qs, ks, lses=lse_arg, backend=backend)

    return provider


PROVIDERS = {
    "original": original,
    "reference": reference,
    "compiled": compiled,
    "cpp": _fused("cpp", False),
    "cpp_lse": _fused("cpp", True),
    "triton": _fused("triton", False),
    "triton_lse": _fused("triton", True),
}


def check_goal(results) -> None:
    """Print whether the fused rollout meets the memory target (docs/performance.md) at the model's shape."""
    by = {(r.case.name.split("-")[0], r.provider): r for r in results}
    base = by.get((GOAL_CASE, BASELINE))
    if base is None or not base.ok or not base.peak_bytes:
        return
    for prov in ("cpp", "cpp_lse", "triton", "triton_lse"):
        r = by.get((GOAL_CASE, prov))
        if r is None or not r.ok or r.peak_bytes is None:
            continue
        ratio = r.peak_bytes / base.peak_bytes
        verdict = "meets" if ratio <= GOAL_RATIO else "MISSES"
        print(
            f"[rollout] {GOAL_CASE} {prov}: extra memory {r.peak_bytes / 2**20:.2f} MiB vs reference "
            f"{base.peak_bytes / 2**20:.2f} MiB = 1/{1 / max(ratio, 1e-12):.0f}; {verdict} the goal <= 1/20"
        )


if __name__ == "__main__":
    check_goal(bench_main(sys.modules[__name__]))
