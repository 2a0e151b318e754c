"""Training-step benchmark: one DCAL ViT-B/16 step (DESIGN sections 6, 9).

``python -m bench.train_step [--quick] [--device cpu|cuda] [--reps 3 --warmup 1] [...]``
(options: :mod:`bench.common`). A ViT-B step at 448 px takes 20 s to 3 min on a 2-core CPU
(depending on load), and the timing process runs 2 setups + 2 x (warmup + reps) steps, so on a
CPU use ``--reps 3 --warmup 1 --timeout 3000`` (the default 900 s timeout is too short there).

One step = forward of every branch of ablation "full" (12 SA blocks, 12 PWCA passes sharing their
weights, 1 GLCA block on CLS + top 10% patches by attention rollout), the uncertainty-weighted
loss, backward and an AdamW step; 200 classes, fp32 (on GPU too: the comparison is about the
attention, not the precision). The model and optimiser state exist before the measured call
(built and warmed up in the provider's setup), so the peak memory is what the step itself needs:
activations, gradients, temporaries.

Providers (same model, same seed, only the attention backend differs):

* ``materialising``: every attention op on ``backend="reference"``: the score matrices of SA
  ([B, 12, 785, 785]) and PWCA ([B, 12, 785, 1570], with ``torch.cat`` of the keys/values) kept for
  backward in every block, and a dense rollout, as the seeds did.
* ``fused``: the default backend chain (``describe`` prints which backend runs here): no score
  matrix, logsumexps saved instead, rollout from q, k and the saved logsumexps.

Cases: CPU batch 2; GPU batches 8 and 16; 448 px (785 tokens). ``--quick``: a 2-block, width-64
model at 64 px, batch 2.
"""
from __future__ import annotations

import math
import sys

import torch

from bench.common import Case, Unavailable, bench_main

NAME = "train_step"
BASELINE = "materialising"
X_LABEL = "batch"

VIT_B = dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12)
QUICK = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def _flops(B: int, p: dict, glca_ratio: float = 0.1) -> float:
    """Matmul FLOPs of one step: forward of SA, PWCA and GLCA blocks, backward counted as 2x."""
    C, L = p["embed_dim"], p["depth"]
    P = (p["img_size"] // p["patch_size"]) ** 2
    N, R = P + 1, math.ceil(glca_ratio * P) + 1  # GLCA queries: CLS + top patches
    dense = lambda n: 2 * n * C * C * (3 + 1 + 8)  # qkv, proj, MLP 4x: 2 flops per MAC
    sa = dense(N) + 4 * N * N * C
    pwca = dense(N) + 2 * N * C * 2 * C + 4 * N * 2 * N * C  # + keys/values of the pair
    glca = 2 * N * C * 2 * C + 2 * R * C * C * 10 + 4 * R * N * C
    embed = 2 * P * C * 3 * p["patch_size"] ** 2
    return 3.0 * B * (L * (sa + pwca) + glca + embed)


def cases(quick: bool, device: str):
    cuda = device.startswith("cuda")
    p = QUICK if quick else VIT_B
    batches = (2,) if quick or not cuda else (8, 16)
    n = (p["img_size"] // p["patch_size"]) ** 2 + 1
    return [Case(name=f"B{b}-{p['img_size']}px", params=dict(B=b, **p, tokens=n), dtype="float32", device=device,
                 mode="fwd+bwd", flops=_flops(b, p), x=b, group="train step") for b in batches]


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


def _step(case: Case, inputs, backend):
    from dcal.models import DCALConfig, DCALViT

    p = case.params
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    cfg = DCALConfig(**{k: p[k] for k in VIT_B}, num_classes=200, ablation="full", backend=backend)
    torch.manual_seed(0)
    model = DCALViT(cfg).to(case.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
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
    return _step(case, inputs, None)


PROVIDERS = {"materialising": materialising, "fused": fused}


if __name__ == "__main__":
    bench_main(sys.modules[__name__])
