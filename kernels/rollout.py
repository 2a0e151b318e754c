"""Triton kernels of attention rollout (docs/contract.md, attention_rollout), without any [N, N] matrix.

The CLS row of ``S_L @ ... @ S_1`` is a row vector pushed through the blocks from the last to the
first: ``r = e_0``; for l = L..1: ``r <- (1 - residual) * (r A_l) + residual * r``. ``r A_l`` is
the dV step of flash-attention backward with r in the place of dO and a one-wide V:

    (r A_l)_j = 1/H sum_h sum_i r_i exp(s_ij - lse_i)

Two kernels, launched once per block:
  ``_rollout_lse_kernel``  (only when no logsumexps are given) grid (query blocks, B*H): the
      online logsumexp of each query row over all keys.
  ``_rollout_vec_kernel``  grid (key blocks, B): for its keys, loops over heads and query blocks,
      accumulates ``r_i exp(s_ij - lse_i)`` in fp32 and writes the mixed new r. Heads are summed
      inside one program in a fixed order, so results are deterministic.
Memory beyond the inputs: the [B, H, N] logsumexps and two [B, N] vectors.

The first step (block L) has ``r = e_0``: only query row 0 carries weight, so both kernels get
``NQ = 1`` and the step costs O(N) instead of O(N^2).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import BLOCK_DS, TRITON_DTYPES, Launch, block_d
from ._device import on_device_of


@triton.jit(do_not_specialize=["H", "N", "NQ", "D"])
def _rollout_lse_kernel(
    Q,
    K,
    LSE,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    H,
    N,
    NQ,
    D,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    # [BLOCK_M, BLOCK_D]
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
        mask=(offs_m[:, None] < NQ) & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        kn = start + offs_n
        # [BLOCK_N, BLOCK_D]
        k = tl.load(
            K + b * skb + h * skh + kn[:, None] * skn + offs_d[None, :],
            mask=(kn[:, None] < N) & mask_d[None, :],
            other=0.0,
        )
        # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]; "ieee": exact fp32, no tf32
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(kn[None, :] < N, s, float("-inf"))
        # Every block holds at least one real key, so m_new is finite and the rescale of the
        # running sum never computes -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    # [BLOCK_M]
    tl.store(LSE + bh * N + offs_m, m_i + tl.log(l_i), mask=offs_m < NQ)


@triton.jit(do_not_specialize=["H", "N", "NQ", "D"])
def _rollout_vec_kernel(
    Q,
    K,
    LSE,
    R_IN,
    R_OUT,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    H,
    N,
    NQ,
    D,
    scale,
    mix,
    keep,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        # [BLOCK_N, BLOCK_D]
        k = tl.load(
            K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        for start in range(0, NQ, BLOCK_M):
            offs_m = start + offs_m0
            mask_m = offs_m < NQ
            # [BLOCK_M, BLOCK_D]
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            # [BLOCK_M]
            lse = tl.load(LSE + (b * H + h) * N + offs_m, mask=mask_m, other=0.0)
            r = tl.load(R_IN + b * N + offs_m, mask=mask_m, other=0.0)
            # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            # Rows past NQ have a made-up lse of 0, so their exp could overflow: drop them
            # before multiplying by their zero weight (0 * inf is nan).
            p = tl.where(mask_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            # [BLOCK_M, 1] * [BLOCK_M, BLOCK_N] summed over rows -> [BLOCK_N]
            acc += tl.sum(r[:, None] * p, 0)
    # [BLOCK_N]
    r_old = tl.load(R_IN + b * N + offs_n, mask=mask_n, other=0.0)
    tl.store(R_OUT + b * N + offs_n, mix * (acc / H) + keep * r_old, mask=mask_n)


# ----------------------------------------------------------------------------- launch choices

# (BLOCK_M, BLOCK_N, num_warps) per (fp32?, BLOCK_D), chosen so that no configuration spills on
# sm_80/sm_90 (ptxas -v). fp32 dots run on FMA units ("ieee"), with operands and the score tile in
# registers, so fp32 takes smaller tiles than fp16/bf16, whose dots go through shared memory.
# The lse kernel keeps a q tile for the whole key loop; the vec kernel keeps a k tile over the
# head and query loops.
_LSE_TILES = {
    (False, 16): (64, 64, 4),
    (False, 32): (64, 64, 4),
    (False, 64): (64, 64, 4),
    (False, 128): (64, 32, 4),
    (True, 16): (64, 64, 4),
    (True, 32): (64, 64, 4),
    (True, 64): (64, 32, 4),
    (True, 128): (32, 32, 8),
}
_VEC_TILES = {
    (False, 16): (64, 64, 4),
    (False, 32): (64, 64, 4),
    (False, 64): (64, 64, 4),
    (False, 128): (64, 32, 4),
    (True, 16): (32, 32, 4),
    (True, 32): (32, 32, 4),
    (True, 64): (32, 32, 4),
    (True, 128): (16, 32, 4),
}


def _tile(table, dtype: torch.dtype, bd: int) -> Launch:
    bm, bn, warps = table[(dtype == torch.float32, bd)]
    return Launch(block_m=bm, block_n=bn, num_warps=warps, num_stages=2)


def lse_config(dtype: torch.dtype, bd: int) -> Launch:
    """Launch choice of the logsumexp kernel."""
    return _tile(_LSE_TILES, dtype, bd)


def vec_config(dtype: torch.dtype, bd: int) -> Launch:
    """Launch choice of the vector-times-attention kernel."""
    return _tile(_VEC_TILES, dtype, bd)


def _identity(kernel):
    return kernel


def rollout_fwd(
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    lses: Optional[Sequence[torch.Tensor]],
    scale: float,
    residual: float,
    wrap=_identity,
) -> torch.Tensor:
    """Row 0 of ``S_L @ ... @ S_1``: [B, N] fp32. ``wrap`` is ``torch.library.wrap_triton``
    inside the custom op (so torch.compile sees the kernels) and the identity otherwise."""
    q0 = qs[0]
    B, H, N, D = q0.shape
    if q0.dtype not in TRITON_DTYPES:
        raise TypeError(f"qs[0] has dtype {q0.dtype}; the Triton rollout takes float16, bfloat16 or float32")
    if D > 128:
        raise ValueError(f"qs[0] has head dim {D}; the Triton rollout takes at most 128")
    bd = block_d(D)
    lcfg, vcfg = lse_config(q0.dtype, bd), vec_config(q0.dtype, bd)
    r = torch.zeros((B, N), dtype=torch.float32, device=q0.device)
    if B == 0 or N == 0:
        return r
    r[:, 0] = 1.0
    r_next = torch.empty_like(r)
    lse_buf = None if lses else torch.empty((B, H, N), dtype=torch.float32, device=q0.device)
    mix, keep = 1.0 - residual, residual
    L = len(qs)
    with on_device_of(q0):  # launch on the tensors' GPU, not the current one
        for l in range(L - 1, -1, -1):
            # Only the head-dim stride must be 1; views of a fused qkv are read in place.
            q = qs[l] if qs[l].stride(-1) == 1 else qs[l].contiguous()
            k = ks[l] if ks[l].stride(-1) == 1 else ks[l].contiguous()
            nq = 1 if l == L - 1 else N  # r = e_0 on the first step
            if lses:
                lse = lses[l].to(torch.float32).contiguous()
            else:
                lse = lse_buf
                grid = (triton.cdiv(nq, lcfg.block_m), B * H)
                wrap(_rollout_lse_kernel)[grid](
                    q,
                    k,
                    lse,
                    q.stride(0),
                    q.stride(1),
                    q.stride(2),
                    k.stride(0),
                    k.stride(1),
                    k.stride(2),
                    H,
                    N,
                    nq,
                    D,
                    float(scale),
                    BLOCK_D=bd,
                    **lcfg.kwargs(),
                )
            grid = (triton.cdiv(N, vcfg.block_n), B)
            wrap(_rollout_vec_kernel)[grid](
                q,
                k,
                lse,
                r,
                r_next,
                q.stride(0),
                q.stride(1),
                q.stride(2),
                k.stride(0),
                k.stride(1),
                k.stride(2),
                H,
                N,
                nq,
                D,
                float(scale),
                float(mix),
                float(keep),
                BLOCK_D=bd,
                **vcfg.kwargs(),
            )
            r, r_next = r_next, r
    return r


# ----------------------------------------------------------------------------- AOT


def aot_specs() -> List[KernelSpec]:
    """Every configuration the launcher can pick: 2 kernels x 3 dtypes x BLOCK_D 16..128."""
    specs = []
    strides = {n: "i32" for n in ("sqb", "sqh", "sqn", "skb", "skh", "skn")}
    for dtype, ty in TRITON_DTYPES.items():
        for bd in BLOCK_DS:
            cfg = lse_config(dtype, bd)
            sig = {
                "Q": f"*{ty}",
                "K": f"*{ty}",
                "LSE": "*fp32",
                **strides,
                "H": "i32",
                "N": "i32",
                "NQ": "i32",
                "D": "i32",
                "scale": "fp32",
                "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr",
                "BLOCK_D": "constexpr",
            }
            const = {**cfg.constexprs(), "BLOCK_D": bd}
            specs.append(
                KernelSpec(
                    "rollout_lse", _rollout_lse_kernel, sig, const, **cfg.options(), label={"dtype": ty, **const}
                )
            )
            cfg = vec_config(dtype, bd)
            sig = {
                "Q": f"*{ty}",
                "K": f"*{ty}",
                "LSE": "*fp32",
                "R_IN": "*fp32",
                "R_OUT": "*fp32",
                **strides,
                "H": "i32",
                "N": "i32",
                "NQ": "i32",
                "D": "i32",
                "scale": "fp32",
                "mix": "fp32",
                "keep": "fp32",
                "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr",
                "BLOCK_D": "constexpr",
            }
            const = {**cfg.constexprs(), "BLOCK_D": bd}
            specs.append(
                KernelSpec(
                    "rollout_vec", _rollout_vec_kernel, sig, const, **cfg.options(), label={"dtype": ty, **const}
                )
            )
    return specs
