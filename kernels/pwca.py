"""Multi-segment (PWCA) attention in Triton: forward and backward, FlashAttention-2 style.

``out = softmax(q @ cat(k1, k2)^T * scale) @ cat(v1, v2)`` for one or two key/value segments,
computed in one pass with one online softmax that walks segment 1's key blocks and then
segment 2's. Nothing of size [Nq, Nk] is ever stored: the forward saves the output and the fp32
natural-log logsumexp, the backward recomputes the probabilities from them.

Kernels (program grid in brackets):
  _pwca_fwd_kernel        [query block, batch*head]  -> out, lse
  _pwca_bwd_preprocess    [query block, batch*head]  -> delta = rowsum(dO * O) - dlse
  _pwca_bwd_dkdv_kernel   [key block, batch*head], launched once per segment -> dk, dv
  _pwca_bwd_dq_kernel     [query block, batch*head]  -> dq (walks both segments)
Every output element is written by exactly one program, so no atomics are needed.

Inputs are [B, H, N, D] with any strides whose last one is 1 (the views that a qkv
reshape + permute produces run without a copy). Head dims 16..128 in steps of 8 are padded to
a power of two (BLOCK_D) with masks; token counts need not be multiples of the tiles. Dots take
fp16/bf16 operands as they are and accumulate in fp32; fp32 inputs use IEEE fp32 dots (no TF32),
so fp32 results are exact to rounding.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

# launches go through wrap_triton so torch.compile can trace them (a no-op under the interpreter)
from torch.library import wrap_triton

from . import _common as C
from ._aot import KernelSpec
from ._common import BLOCK_DS, TRITON_DTYPES, Launch, block_d
from ._constexpr import LN2, LOG2E
from ._device import on_device_of

# ----------------------------------------------------------------------------- per-program setup


@triton.jit
def _program_rows(pid, bh, H, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every kernel starts with: batch and head of program column ``bh`` (64-bit, since
    B*H*N*D may exceed 2**31 elements), the BLOCK rows of program ``pid`` among N and the
    head-dim offsets, with their masks."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, offs, offs_d, offs < N, offs_d < D


@triton.jit
def _row_ptrs(base, b, h, s_b, s_h, s_n, offs, offs_d):
    """[rows, BD] pointers of rows ``offs`` of (batch b, head h) of a [B, H, N, D] tensor with
    unit head-dim stride."""
    return base + b * s_b + h * s_h + offs[:, None] * s_n + offs_d[None, :]


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_segment(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    n_keys,
    qk_scale,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < n_keys
        # [BD, BN]: keys are loaded transposed so the dot needs no permute
        kT = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        # [BM, BD] @ [BD, BN] -> [BM, BN], in log2 units
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        # keys past the segment's end are padding, not zero logits
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rescale what was accumulated under the old running max
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # [BN, BD]
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["NQ", "NK1", "NK2"])
def _pwca_fwd_kernel(
    Q,
    K1,
    V1,
    K2,
    V2,
    O,
    LSE,
    sq_b,
    sq_h,
    sq_n,
    sk1_b,
    sk1_h,
    sk1_n,
    sv1_b,
    sv1_h,
    sv1_n,
    sk2_b,
    sk2_h,
    sk2_n,
    sv2_b,
    sv2_h,
    sv2_n,
    so_b,
    so_h,
    so_n,
    H,
    NQ,
    NK1,
    NK2,
    D,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SEG2: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h, offs_m, offs_d, m_mask, d_mask = _program_rows(tl.program_id(0), bh, H, NQ, D, BLOCK_M, BLOCK_D)
    # [BM, BD]
    q = tl.load(_row_ptrs(Q, b, h, sq_b, sq_h, sq_n, offs_m, offs_d), mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_segment(
        acc,
        m_i,
        l_i,
        q,
        K1 + b * sk1_b + h * sk1_h,
        V1 + b * sv1_b + h * sv1_h,
        sk1_n,
        sv1_n,
        NK1,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        DOT_PREC,
    )
    if HAS_SEG2:
        # the same running max and sum continue over the second segment: one softmax over both
        acc, m_i, l_i = _fwd_segment(
            acc,
            m_i,
            l_i,
            q,
            K2 + b * sk2_b + h * sk2_h,
            V2 + b * sv2_b + h * sv2_h,
            sk2_n,
            sv2_n,
            NK2,
            qk_scale,
            offs_d,
            d_mask,
            BLOCK_N,
            DOT_PREC,
        )
    acc = acc / l_i[:, None]
    tl.store(
        _row_ptrs(O, b, h, so_b, so_h, so_n, offs_m, offs_d),
        acc.to(O.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    # stored in natural log (the public statistic); the kernels work in log2
    tl.store(LSE + bh * NQ + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["NQ"])
def _pwca_bwd_preprocess(
    O,
    DO,
    DLSE,
    DELTA,
    so_b,
    so_h,
    so_n,
    sdo_b,
    sdo_h,
    sdo_n,
    H,
    NQ,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h, offs_m, offs_d, m_mask, d_mask = _program_rows(tl.program_id(0), bh, H, NQ, D, BLOCK_M, BLOCK_D)
    mask = m_mask[:, None] & d_mask[None, :]
    # [BM, BD]
    o = tl.load(_row_ptrs(O, b, h, so_b, so_h, so_n, offs_m, offs_d), mask=mask, other=0.0)
    do = tl.load(_row_ptrs(DO, b, h, sdo_b, sdo_h, sdo_n, offs_m, offs_d), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d logit = p, so a gradient on lse adds p * dlse to dS = p * (dP - delta):
        # it folds into delta and the main kernels need not know about it
        delta -= tl.load(DLSE + bh * NQ + offs_m, mask=m_mask, other=0.0)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=m_mask)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _pwca_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sdo_b,
    sdo_h,
    sdo_n,
    sdk_b,
    sdk_h,
    sdk_n,
    sdv_b,
    sdv_h,
    sdv_n,
    H,
    NQ,
    NK,
    D,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # One segment's key block against every query. The probabilities use the lse over *all*
    # segments, so each segment's dK/dV comes out exact without seeing the other segment.
    bh = tl.program_id(1)
    b, h, offs_n, offs_d, n_mask, d_mask = _program_rows(tl.program_id(0), bh, H, NK, D, BLOCK_N, BLOCK_D)
    qk_scale = scale * LOG2E
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # [BN, BD]
    k = tl.load(_row_ptrs(K, b, h, sk_b, sk_h, sk_n, offs_n, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_row_ptrs(V, b, h, sv_b, sv_h, sv_n, offs_n, offs_d), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        m_mask = offs_m < NQ
        # [BD, BM]
        qT = tl.load(
            q_base + offs_m[None, :] * sq_n + offs_d[:, None], mask=m_mask[None, :] & d_mask[:, None], other=0.0
        )
        # [BM]
        lse = tl.load(LSE + bh * NQ + offs_m, mask=m_mask, other=0.0) * LOG2E
        delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_mask, other=0.0)
        # [BN, BD] @ [BD, BM] -> [BN, BM]
        sT = tl.dot(k, qT, input_precision=DOT_PREC)
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        # padded query columns must add nothing
        pT = tl.where(m_mask[None, :], pT, 0.0)
        # [BM, BD]
        do = tl.load(
            do_base + offs_m[:, None] * sdo_n + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        # [BN, BM] @ [BM, BD] -> [BN, BD]
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        # [BN, BD] @ [BD, BM] -> [BN, BM]
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        # [BN, BM] @ [BM, BD] -> [BN, BD]
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(_row_ptrs(DK, b, h, sdk_b, sdk_h, sdk_n, offs_n, offs_d), dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_row_ptrs(DV, b, h, sdv_b, sdv_h, sdv_n, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_segment(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    n_keys,
    qk_scale,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < n_keys
        kv_mask = n_mask[None, :] & d_mask[:, None]
        # [BD, BN]
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        s = tl.dot(q, kT, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        # padded keys are zero vectors, whose logit 0 would otherwise count
        p = tl.where(n_mask[None, :], p, 0.0)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        dq = tl.dot(ds.to(q.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["NQ", "NK1", "NK2"])
def _pwca_bwd_dq_kernel(
    Q,
    K1,
    V1,
    K2,
    V2,
    DO,
    LSE,
    DELTA,
    DQ,
    sq_b,
    sq_h,
    sq_n,
    sk1_b,
    sk1_h,
    sk1_n,
    sv1_b,
    sv1_h,
    sv1_n,
    sk2_b,
    sk2_h,
    sk2_n,
    sv2_b,
    sv2_h,
    sv2_n,
    sdo_b,
    sdo_h,
    sdo_n,
    sdq_b,
    sdq_h,
    sdq_n,
    H,
    NQ,
    NK1,
    NK2,
    D,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SEG2: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h, offs_m, offs_d, m_mask, d_mask = _program_rows(tl.program_id(0), bh, H, NQ, D, BLOCK_M, BLOCK_D)
    qk_scale = scale * LOG2E
    mask = m_mask[:, None] & d_mask[None, :]
    # [BM, BD]
    q = tl.load(_row_ptrs(Q, b, h, sq_b, sq_h, sq_n, offs_m, offs_d), mask=mask, other=0.0)
    do = tl.load(_row_ptrs(DO, b, h, sdo_b, sdo_h, sdo_n, offs_m, offs_d), mask=mask, other=0.0)
    # [BM]
    lse = tl.load(LSE + bh * NQ + offs_m, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_segment(
        dq,
        q,
        do,
        lse,
        delta,
        K1 + b * sk1_b + h * sk1_h,
        V1 + b * sv1_b + h * sv1_h,
        sk1_n,
        sv1_n,
        NK1,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        DOT_PREC,
    )
    if HAS_SEG2:
        dq = _dq_segment(
            dq,
            q,
            do,
            lse,
            delta,
            K2 + b * sk2_b + h * sk2_h,
            V2 + b * sv2_b + h * sv2_h,
            sk2_n,
            sv2_n,
            NK2,
            qk_scale,
            offs_d,
            d_mask,
            BLOCK_N,
            DOT_PREC,
        )
    dq = dq * scale
    tl.store(_row_ptrs(DQ, b, h, sdq_b, sdq_h, sdq_n, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch choices


def _tile(block_m: int, block_n: int, num_warps: int, num_stages: int) -> Launch:
    """A (query rows, key rows) tile with its warps and stages."""
    return Launch(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


class PwcaConfig(NamedTuple):
    block_d: int
    fwd: Launch  # program: one query block, loop over keys
    dkdv: Launch  # program: one key block (block_n), loop over queries (block_m)
    dq: Launch  # program: one query block, loop over keys
    pre: Launch  # delta pre-pass: block_m rows
    dot_prec: str


@functools.lru_cache(maxsize=None)
def pwca_config(head_dim: int, dtype: torch.dtype, cc: int = 80) -> PwcaConfig:
    """Block sizes for one (head dim, dtype, architecture), chosen once and reused by the forward
    and the backward. ``cc`` is the compute capability as 10*major+minor (80 for the interpreter).

    Why these (each checked with ptxas -v for sm_80 and sm_90, see ``aot_specs``): 8 warps share
    a 128-row fp16/bf16 query tile, so the [BM, BD] fp32 accumulator, the [BM, BN] scores and q
    stay in registers without spilling (4 warps spill at D=64); fp32 operands take twice the
    registers and shared memory, so fp32 tiles are halved. The backward holds k, v and two [BN, BD] fp32
    accumulators (dk, dv) per key block, hence 32-key blocks. Parts with ~100 KB of shared memory
    per SM (sm_86/89/120) get fewer pipeline stages in the forward than sm_80/sm_90 (164/228 KB).
    """
    bd = block_d(head_dim)
    stages = 3 if cc in (80, 90) else 2
    if dtype == torch.float32:
        if bd <= 32:
            fwd, dkdv, dq = _tile(32, 32, 4, 2), _tile(32, 32, 4, 2), _tile(32, 32, 4, 2)
        elif bd == 64:
            fwd, dkdv, dq = _tile(64, 32, 8, 2), _tile(32, 32, 4, 2), _tile(32, 32, 4, 2)
        else:
            fwd, dkdv, dq = _tile(32, 16, 8, 2), _tile(16, 32, 4, 2), _tile(32, 32, 8, 2)
        prec = "ieee"
    else:
        if bd <= 64:
            fwd, dkdv, dq = _tile(128, 64, 8, stages), _tile(64, 32, 4, 2), _tile(64, 32, 4, 2)
        else:
            fwd, dkdv, dq = _tile(128, 32, 8, stages), _tile(64, 32, 8, 2), _tile(32, 32, 4, 2)
        prec = "tf32"  # ignored for 16-bit operands; one value keeps the spec list short
    # the pre-pass streams O and dO once: 16 elements of each per thread keep it spill-free
    pre = Launch(block_m=max(16, 2048 // bd), num_warps=4, num_stages=1)
    return PwcaConfig(bd, fwd, dkdv, dq, pre, prec)


def _cc(device: torch.device) -> int:
    if device.type != "cuda" or not torch.cuda.is_available():
        # the interpreter, or tracing fake CUDA tensors without a GPU: sm_80's tiles, so CPU tests
        # run the real configurations
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def config_for(q: torch.Tensor) -> PwcaConfig:
    return pwca_config(q.shape[-1], q.dtype, _cc(q.device))


# ----------------------------------------------------------------------------- launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index tokens and heads by stride but need unit stride along the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhn(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q, segs):
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; the Triton PWCA kernels take float16, bfloat16 or float32")
    for i, (k, v) in enumerate(segs, 1):
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k{i}/v{i} have dtypes {k.dtype}/{v.dtype} but q has {q.dtype}; all must match")
    if not 16 <= q.shape[-1] <= 128 or q.shape[-1] % 8:
        raise ValueError(f"q has head dim {q.shape[-1]}; the Triton PWCA kernels take 16..128 in steps of 8")
    for i, (k, v) in enumerate(segs, 1):
        if k.shape[2] < 1:
            raise ValueError(f"k{i} has no tokens; each segment needs at least one key")


def pwca_fwd(q, k1, v1, k2=None, v2=None, scale=None, config: Optional[PwcaConfig] = None):
    """Forward: (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32, natural log).

    q [B, H, Nq, D]; k1, v1 [B, H, Nk1, D]; k2, v2 [B, H, Nk2, D] or None for one segment.
    Launched on q's device (:func:`~dcal.kernels._device.on_device_of`).
    """
    with on_device_of(q):
        return _pwca_fwd(q, k1, v1, k2, v2, scale, config)


def _pwca_fwd(q, k1, v1, k2, v2, scale, config):
    q, k1, v1 = _rows(q), _rows(k1), _rows(v1)
    two = k2 is not None
    if two:
        k2, v2 = _rows(k2), _rows(v2)
    _check(q, [(k1, v1)] + ([(k2, v2)] if two else []))
    B, H, NQ, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    cfg = config or config_for(q)
    t = cfg.fwd
    out = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    k2_, v2_ = (k2, v2) if two else (k1, v1)  # never read when HAS_SEG2 is False
    grid = (triton.cdiv(NQ, t.block_m), B * H)
    wrap_triton(_pwca_fwd_kernel)[grid](
        q,
        k1,
        v1,
        k2_,
        v2_,
        out,
        lse,
        *_bhn(q),
        *_bhn(k1),
        *_bhn(v1),
        *_bhn(k2_),
        *_bhn(v2_),
        *_bhn(out),
        H,
        NQ,
        k1.shape[2],
        k2_.shape[2] if two else 0,
        D,
        scale * C.LOG2E,
        BLOCK_D=cfg.block_d,
        HAS_SEG2=two,
        DOT_PREC=cfg.dot_prec,
        **t.kwargs(),
    )
    return out, lse


def pwca_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale=None, config: Optional[PwcaConfig] = None):
    """Backward: (dq, dk1, dv1, dk2, dv2); dk2, dv2 are None for one segment. ``dlse`` (the
    gradient on the returned lse, [B, H, Nq]) may be None. Launched on q's device."""
    with on_device_of(q):
        return _pwca_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale, config)


def _pwca_bwd(dout, dlse, q, k1, v1, k2, v2, out, lse, scale, config):
    q, k1, v1, out, dout = _rows(q), _rows(k1), _rows(v1), _rows(out), _rows(dout)
    two = k2 is not None
    if two:
        k2, v2 = _rows(k2), _rows(v2)
    B, H, NQ, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    cfg = config or config_for(q)
    lse = lse.contiguous()
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_ = dlse.to(torch.float32).contiguous() if has_dlse else lse  # never read when HAS_DLSE is False

    t = cfg.pre
    wrap_triton(_pwca_bwd_preprocess)[(triton.cdiv(NQ, t.block_m), B * H)](
        out,
        dout,
        dlse_,
        delta,
        *_bhn(out),
        *_bhn(dout),
        H,
        NQ,
        D,
        BLOCK_D=cfg.block_d,
        HAS_DLSE=has_dlse,
        **t.kwargs(),
    )

    segs = [(k1, v1)] + ([(k2, v2)] if two else [])
    grads = []
    t = cfg.dkdv
    for k, v in segs:
        NK = k.shape[2]
        dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=v.device)
        wrap_triton(_pwca_bwd_dkdv_kernel)[(triton.cdiv(NK, t.block_n), B * H)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            *_bhn(q),
            *_bhn(k),
            *_bhn(v),
            *_bhn(dout),
            *_bhn(dk),
            *_bhn(dv),
            H,
            NQ,
            NK,
            D,
            scale,
            BLOCK_D=cfg.block_d,
            DOT_PREC=cfg.dot_prec,
            **t.kwargs(),
        )
        grads += [dk, dv]

    t = cfg.dq
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    k2_, v2_ = (k2, v2) if two else (k1, v1)
    wrap_triton(_pwca_bwd_dq_kernel)[(triton.cdiv(NQ, t.block_m), B * H)](
        q,
        k1,
        v1,
        k2_,
        v2_,
        dout,
        lse,
        delta,
        dq,
        *_bhn(q),
        *_bhn(k1),
        *_bhn(v1),
        *_bhn(k2_),
        *_bhn(v2_),
        *_bhn(dout),
        *_bhn(dq),
        H,
        NQ,
        k1.shape[2],
        k2_.shape[2] if two else 0,
        D,
        scale,
        BLOCK_D=cfg.block_d,
        HAS_SEG2=two,
        DOT_PREC=cfg.dot_prec,
        **t.kwargs(),
    )
    if not two:
        grads += [None, None]
    return (dq, *grads)


# ----------------------------------------------------------------------------- AOT specs

_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_SEG2", "HAS_DLSE", "DOT_PREC")


def _signature(kernel, ptrs):
    """Triton types of a kernel's arguments: ``ptrs`` maps pointer args to their element type;
    stride/size ints are i32, float scalars fp32, constexprs "constexpr"."""
    # the interpreter's kernel objects carry no arg_names; the Python function has them
    names = getattr(kernel, "arg_names", None) or list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for name in names:
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        elif name in _CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def aot_specs(ccs=(80, 90)):
    """Every configuration the launchers can pick on the given architectures, for fp16, bf16 and
    fp32 and every BLOCK_D (16, 32, 64, 128), with and without a second segment (and with and
    without an lse gradient in the pre-pass). Duplicates across architectures are listed once."""
    specs, seen = [], set()

    def add(name, kernel, ptrs, tile: Launch, base, **flags):
        """One spec: the tile's block sizes, BLOCK_D and ``flags`` (HAS_SEG2, DOT_PREC...) as
        constexprs; the label shows the dtype, the block sizes and the flags other than DOT_PREC."""
        sig = _signature(kernel, ptrs)
        consts = dict(tile.constexprs(), **flags, BLOCK_D=base["BLOCK_D"])
        key = (name, tuple(sig.items()), tuple(sorted(consts.items())), tile.num_warps, tile.num_stages)
        if key in seen:
            return
        seen.add(key)
        label = dict(base, **tile.constexprs(), **{k: v for k, v in flags.items() if k != "DOT_PREC"})
        specs.append(KernelSpec(name, kernel, sig, consts, **tile.options(), label=label))

    for cc in ccs:
        for dtype, tt in TRITON_DTYPES.items():
            for bd in BLOCK_DS:
                cfg = pwca_config(bd, dtype, cc)
                f32, prec = "fp32", cfg.dot_prec
                base = dict(dtype=tt, BLOCK_D=bd)
                for two in (False, True):
                    ptrs = dict(Q=tt, K1=tt, V1=tt, K2=tt, V2=tt, O=tt, LSE=f32)
                    add("pwca_fwd", _pwca_fwd_kernel, ptrs, cfg.fwd, base, HAS_SEG2=two, DOT_PREC=prec)
                    ptrs = dict(Q=tt, K1=tt, V1=tt, K2=tt, V2=tt, DO=tt, LSE=f32, DELTA=f32, DQ=tt)
                    add("pwca_bwd_dq", _pwca_bwd_dq_kernel, ptrs, cfg.dq, base, HAS_SEG2=two, DOT_PREC=prec)
                    ptrs = dict(O=tt, DO=tt, DLSE=f32, DELTA=f32)
                    add("pwca_bwd_preprocess", _pwca_bwd_preprocess, ptrs, cfg.pre, base, HAS_DLSE=two)
                ptrs = dict(Q=tt, K=tt, V=tt, DO=tt, LSE=f32, DELTA=f32, DK=tt, DV=tt)
                add("pwca_bwd_dkdv", _pwca_bwd_dkdv_kernel, ptrs, cfg.dkdv, base, DOT_PREC=prec)
    return specs
