"""FLOP formulas of the benchmarks (``bench/`` and ``dcal.check.bench``): one home each.

Forward+backward counts follow FlashAttention's benchmarks: the backward of attention does five
matmuls of the forward's size against the forward's two, so ``fwd+bwd`` is 3.5x the forward.
"""

from __future__ import annotations

import math

BWD_OVER_FWD = 2.5  # backward FLOPs / forward FLOPs of attention (5 matmuls against 2)


def flops_attention(batch: int, heads: int, nq: int, nk: int, head_dim: int, mode: str = "fwd") -> float:
    """FLOPs of exact attention of nq queries over nk keys: two matmuls (QK^T, PV) of
    2*nq*nk*D each forward; the backward does five such matmuls (recomputed QK^T, dV, dP, dQ, dK),
    so fwd+bwd counts 2 + 5 = 7 (the convention of FlashAttention's benchmarks: bwd = 2.5 x fwd)."""
    fwd = 4.0 * batch * heads * nq * nk * head_dim
    return fwd if mode == "fwd" else (1.0 + BWD_OVER_FWD) * fwd


def flops_neighborhood(
    batch: int, heads: int, x: int, y: int, kernel_size: int, head_dim: int, mode: str = "fwd"
) -> float:
    """4*k*k*D per query and head forward (logits and weighted sum over the k x k window);
    fwd+bwd 3.5x that. Border positions count as a full window (the useful work of the zero
    border; the mask border does a little less)."""
    return flops_attention(batch, heads, x * y, kernel_size * kernel_size, head_dim, mode)


def flops_rollout(batch: int, heads: int, tokens: int, head_dim: int, layers: int) -> float:
    """2*N*N*D per head and layer for the scores q k^T: the useful work, with or without the blocks'
    logsumexps (the C++ kernel and the dense softmax both take them from the one score matrix)."""
    return 2.0 * batch * heads * tokens * tokens * head_dim * layers


def flops_matmul(m: int, n: int, k: int) -> float:
    """2*m*n*k: one multiply and one add per multiply-accumulate."""
    return 2.0 * m * n * k


def flops_vit_step(batch: int, p: dict, glca_ratio: float = 0.1) -> float:
    """Matmul FLOPs of one DCAL training step: forward of SA, PWCA and GLCA blocks, backward 2x.

    p: ``img_size``, ``patch_size``, ``embed_dim``, ``depth`` (as :class:`dcal.models.DCALConfig`)."""
    C, L = p["embed_dim"], p["depth"]
    P = (p["img_size"] // p["patch_size"]) ** 2
    N, R = P + 1, math.ceil(glca_ratio * P) + 1  # GLCA queries: CLS + top patches
    dense = lambda n: 2 * n * C * C * (3 + 1 + 8)  # noqa: E731  (qkv, proj, MLP 4x: 2 flops per MAC)
    sa = dense(N) + 4 * N * N * C
    pwca = dense(N) + 4 * N * 2 * N * C  # the pair's keys/values come from the SA pass
    glca = 2 * N * C * 2 * C + 2 * R * C * C * 10 + 4 * R * N * C
    embed = 2 * P * C * 3 * p["patch_size"] ** 2
    return 3.0 * batch * (L * (sa + pwca) + glca + embed)


__all__ = ["flops_attention", "flops_matmul", "flops_neighborhood", "flops_rollout", "flops_vit_step"]
