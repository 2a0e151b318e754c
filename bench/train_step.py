"""Training-step benchmark: one DCAL ViT-B/16 step (docs/contract.md, Models; docs/performance.md).

``python -m bench.train_step [--quick] [--device cpu|cuda] [...]`` (options: :mod:`bench.common`).
A ViT-B step at 448 px takes 30 s to 3 min on a 2-core CPU (depending on load), so on a CPU the
case is ``heavy``: the default run measures one step per provider (time and peak memory of the
same step, in its own process); ``--full`` (or ``--reps 3 --warmup 1 --timeout 3000``) times
interleaved rounds after warm-up steps.

One step = forward of every branch of ablation "full" (12 SA blocks, 12 PWCA passes sharing their
weights, 1 GLCA block on CLS + top 10% patches by attention rollout), the uncertainty-weighted
loss, backward and an AdamW step; 200 classes, fp32 (on GPU too: the comparison is about the
attention, not the precision). The model and optimiser state exist before the measured call
(built in the provider's setup, where AdamW's state is created by a step on zero gradients), so
the peak memory is what the step itself needs: activations, gradients, temporaries. Memory floor:
the parameter gradients. FLOPs (:data:`FLOPS`): the matmuls of the forward of every branch, x3.

Providers (same model, same seed, only the attention backend differs):

* ``materialising``: every attention op on ``backend="reference"``: the score matrices of SA
  ([B, 12, 785, 785]) and PWCA ([B, 12, 785, 1570], with ``torch.cat`` of the keys/values) kept for
  backward in every block, and a dense rollout, as the original DCAL code does.
* ``fused``: the default backend chain (``describe`` prints which backend runs here): no score
  matrix, logsumexps saved instead, rollout from q, k and the saved logsumexps; PWCA takes the
  pair's keys/values from the SA pass (as the model always does), and the model option
  ``checkpoint_mlp=True`` (:data:`FUSED_CONFIG`; the case's shape text says so): each MLP keeps its
  matmul outputs and recomputes LayerNorm and GELU in backward.

Cases: CPU batch 2; GPU batches 8 and 16; 448 px (785 tokens). ``--quick``: a 2-block, width-64
model at 64 px, batch 2.
"""

from __future__ import annotations

import functools
import sys

import torch

from bench.common import Case, Unavailable, bench_main, nbytes
from dcal.testing.flops import flops_vit_step

NAME = "train_step"
BASELINE = "materialising"
X_LABEL = "batch"
FLOPS = (
    "matmuls of one step: per block 2*N*C*C*12 (qkv, proj, MLP) + 4*N*N*C (SA), the same with 2N keys for "
    "PWCA (the pair's keys/values are the SA pass's: not projected again), GLCA on 1 + 10% queries, the patch "
    "embedding; forward x3 for forward + backward"
)

VIT_B = dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12)
# Model options of the fused provider only (the materialising one runs the model's defaults).
FUSED_CONFIG = dict(checkpoint_mlp=True)
QUICK = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def cases(quick: bool, device: str):
    cuda = device.startswith("cuda")
    p = QUICK if quick else VIT_B
    batches = (2,) if quick or not cuda else (8, 16)
    n = (p["img_size"] // p["patch_size"]) ** 2 + 1
    return [
        Case(
            name=f"B{b}-{p['img_size']}px",
            params=dict(B=b, **p, tokens=n, fused_config=_options(FUSED_CONFIG)),
            dtype="float32",
            device=device,
            mode="fwd+bwd",
            flops=flops_vit_step(b, p),
            x=b,
            group="train step",
            floor_bytes=nbytes((_param_count(p),), "float32"),
            heavy=not cuda and not quick,
        )
        for b in batches
    ]


@functools.lru_cache(maxsize=None)
def _param_count_of(img_size, patch_size, embed_dim, depth, num_heads) -> int:
    from dcal.models import DCALConfig, DCALViT

    cfg = DCALConfig(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=200,
        ablation="full",
    )
    return sum(t.numel() for t in DCALViT(cfg).parameters())


def _param_count(p: dict) -> int:
    """Parameters of the DCAL ViT of these sizes (the SA blocks, the GLCA block, heads, embeddings)."""
    return _param_count_of(*(p[k] for k in VIT_B))


def _options(cfg: dict) -> str:
    """``checkpoint_mlp=True``: the fused provider's model options as the shape text shows them."""
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"


def describe(device: str) -> str:
    """Which backends the ``fused`` provider runs here (attention and rollout)."""
    import dcal.ops

    q = torch.empty(1, 1, 1, 64, device=device)
    return "\n".join([dcal.ops.explain("pwca_attention", q), dcal.ops.explain("attention_rollout", q)])


def make_inputs(case: Case):
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(p["B"], 3, p["img_size"], p["img_size"], generator=g).to(case.device)
    y = torch.randint(0, 200, (p["B"],), generator=g).to(case.device)
    return x, y


def _step(case: Case, inputs, backend, **options):
    from dcal.models import DCALConfig, DCALViT

    p = case.params
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    cfg = DCALConfig(**{k: p[k] for k in VIT_B}, num_classes=200, ablation="full", backend=backend, **options)
    torch.manual_seed(0)
    model = DCALViT(cfg).to(case.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # AdamW creates its state at the first step: do that here, on zero gradients, so that a
    # measured step (also the first one, when the run measures a single step) is a steady one.
    for t in model.parameters():
        t.grad = torch.zeros_like(t)
    opt.step()
    opt.zero_grad(set_to_none=True)
    x, y = inputs

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def materialising(case, inputs):
    return _step(case, inputs, "reference")


def fused(case, inputs):
    return _step(case, inputs, None, **FUSED_CONFIG)


PROVIDERS = {"materialising": materialising, "fused": fused}


if __name__ == "__main__":
    bench_main(sys.modules[__name__])
