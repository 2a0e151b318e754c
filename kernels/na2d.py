"""2-D neighborhood attention in Triton: tiled forward and backward (DESIGN section 3.4).

Layout [B, H, X, Y, D], contiguous. One program takes a TILE_X x TILE_Y tile of pixels of one
(batch, head), flattened to BLOCK_Q rows, and walks the union of the tile's windows (the halo,
at most (TILE_X + k - 1) x (TILE_Y + k - 1) positions) in flat chunks of BLOCK_N positions with
an online softmax. Every (query, key) pair of a chunk is kept or dropped by the exact window test
of the border mode, so the same code serves all three modes:

    zero   window [i - r, i + r]; off-map positions are zero keys/values that stay in the
           softmax (logit 0 + rpb): they are loaded as zeros, never skipped
    mask   window [i - r, i + r] intersected with the map
    clamp  window [s, s + k) with s = clamp(i - r, 0, n - k) (NATTEN)

Backward: ``delta = rowsum(dO * O)`` pre-pass; dq (and the rpb gradient) per query tile over the
same halo, probabilities recomputed from the saved lse; dk/dv per key tile over the tile's
inverse neighbourhood (the queries whose window holds a key of the tile), using the same window
test, so clamp mode (whose inverse neighbourhood is not symmetric) needs nothing special and no
two programs write the same dk/dv row. The rpb gradient is accumulated with fp32 atomics into a
[H, 2k-1, 2k-1] buffer (its summation order is not deterministic on GPU).

Only q, k, v, rpb, out and the fp32 lse are needed by the backward; nothing has a k*k factor.
Head dims are 16..128 in steps of 8 (padded to BLOCK_D, a power of two, with masks): the kernels
take D / 8 so that the compiler knows every row starts on a 16-byte boundary. Scores are kept in
log2 units (scale and rpb pre-multiplied by log2 e) so the softmax runs on exp2.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec

BORDER_CODES = {"zero": 0, "mask": 1, "clamp": 2}
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _win_start(i, n, border, KS: tl.constexpr):
    """First key position of the window of query position(s) i on an axis of length n."""
    # clamp shifts the window inside the map (n >= KS is checked by the op); the other modes
    # get bounds that never bind, so no branch splits the vector code
    lo = tl.where(border == 2, 0, -(1 << 30))
    hi = tl.where(border == 2, n - KS, 1 << 30)
    return tl.minimum(tl.maximum(i - KS // 2, lo), hi)


@triton.jit
def _halo(a, b, n, border, KS: tl.constexpr):
    """[lo, hi) key positions that the windows of query positions a..b (inclusive) cover."""
    lo = _win_start(a, n, border, KS)
    hi = _win_start(b, n, border, KS) + KS
    if border == 1:
        # mask mode: off-map positions never enter the softmax, so they need not be visited
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(hi, n)
    return lo, hi


@triton.jit
def _inverse_halo(a, b, n, border, KS: tl.constexpr):
    """[lo, hi) query positions whose window holds a key among positions a..b (inclusive)."""
    r = KS // 2
    lo = a - r
    hi = b + r + 1
    if border == 2:
        # clamp: queries near the edge share the edge window, so the edge keys are seen by up
        # to k + r queries on that side
        lo = tl.where(a <= KS - 1, 0, a - r)
        hi = tl.where(b >= n - KS, n, b + r + 1)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, n)
    return lo, hi


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["X", "Y", "D8", "border"])
def _na2d_fwd_kernel(
    Q, K, V, RPB, O, LSE,
    X, Y, H, D8, border, qk_scale,
    KS: tl.constexpr, HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr, TILE_Y: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = TILE_X * TILE_Y
    P: tl.constexpr = 2 * KS - 1
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    n_ty = tl.cdiv(Y, TILE_Y)
    x0 = (pid // n_ty) * TILE_X
    y0 = (pid % n_ty) * TILE_Y
    # D8 = D / 8 makes every row a multiple of 16 bytes; with the launcher's 16-byte aligned
    # tensors, each (batch, head) slice is aligned too and the row loads vectorise
    D = D8 * 8
    base = bh.to(tl.int64) * X * Y * D
    Qb = tl.multiple_of(Q + base, 16)
    Kb = tl.multiple_of(K + base, 16)
    Vb = tl.multiple_of(V + base, 16)
    Ob = tl.multiple_of(O + base, 16)

    offs_q = tl.arange(0, BLOCK_Q)
    qx = x0 + offs_q // TILE_Y
    qy = y0 + offs_q % TILE_Y
    q_ok = (qx < X) & (qy < Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_row = tl.where(q_ok, qx * Y + qy, 0)
    # [BQ, BD]
    q = tl.load(Qb + q_row[:, None] * D + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    # [BQ] window starts, and the rpb offset of each query (its key's part is added per chunk)
    sx = _win_start(qx, X, border, KS)
    sy = _win_start(qy, Y, border, KS)
    q_boff = h * P * P + (KS - 1) * P + (KS - 1) - (qx * P + qy)
    hx0, hx1 = _halo(x0, tl.minimum(x0 + TILE_X, X) - 1, X, border, KS)
    hy0, hy1 = _halo(y0, tl.minimum(y0 + TILE_Y, Y) - 1, Y, border, KS)
    hw = hy1 - hy0
    n_halo = (hx1 - hx0) * hw

    # Finite start so a chunk where a row has no member gives alpha = 1, not NaN.
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_halo
        kx = hx0 + offs_n // hw
        ky = hy0 + offs_n % hw
        on_map = n_ok & (kx >= 0) & (kx < X) & (ky >= 0) & (ky < Y)
        k_row = tl.where(on_map, kx * Y + ky, 0)
        kv_mask = on_map[:, None] & d_ok[None, :]
        # [BN, BD]; off-map rows load as the zero keys/values of zero mode
        k = tl.load(Kb + k_row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(Vb + k_row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        # [BQ, BD] @ [BD, BN] -> [BQ, BN], in log2 units
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        # mask mode leaves off-map keys out; zero mode keeps them as zero keys
        key_ok = n_ok & (on_map | (border != 1))
        dx = kx[None, :] - sx[:, None]
        dy = ky[None, :] - sy[:, None]
        member = (dx >= 0) & (dx < KS) & (dy >= 0) & (dy < KS) & key_ok[None, :]
        if HAS_RPB:
            # [BQ, BN] gather from the [P, P] table of this head
            bias = tl.load(RPB + (q_boff[:, None] + (kx * P + ky)[None, :]), mask=member, other=0.0).to(tl.float32)
            s += bias * 1.4426950408889634
        s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # [BQ, BN] @ [BN, BD] -> [BQ, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # Every real query has at least itself in its window; padded rows are not stored.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Ob + q_row[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * X * Y + q_row, lse, mask=q_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _na2d_bwd_delta_kernel(O, DO, DELTA, N, D8, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    D = D8 * 8
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    # [BM, BD]
    o = tl.load(O + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit(do_not_specialize=["X", "Y", "D8", "border"])
def _na2d_bwd_dq_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DQ, DRPB,
    X, Y, H, D8, border, qk_scale, scale,
    KS: tl.constexpr, HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr, TILE_Y: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = TILE_X * TILE_Y
    P: tl.constexpr = 2 * KS - 1
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    n_ty = tl.cdiv(Y, TILE_Y)
    x0 = (pid // n_ty) * TILE_X
    y0 = (pid % n_ty) * TILE_Y
    # D8 = D / 8 makes every row a multiple of 16 bytes; with the launcher's 16-byte aligned
    # tensors, each (batch, head) slice is aligned too and the row loads vectorise
    D = D8 * 8
    base = bh.to(tl.int64) * X * Y * D
    Qb = tl.multiple_of(Q + base, 16)
    Kb = tl.multiple_of(K + base, 16)
    Vb = tl.multiple_of(V + base, 16)
    DOb = tl.multiple_of(DO + base, 16)
    DQb = tl.multiple_of(DQ + base, 16)
    sbase = bh.to(tl.int64) * X * Y

    offs_q = tl.arange(0, BLOCK_Q)
    qx = x0 + offs_q // TILE_Y
    qy = y0 + offs_q % TILE_Y
    q_ok = (qx < X) & (qy < Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_row = tl.where(q_ok, qx * Y + qy, 0)
    qd_mask = q_ok[:, None] & d_ok[None, :]
    # [BQ, BD]
    q = tl.load(Qb + q_row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DOb + q_row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    # [BQ]
    lse2 = tl.load(LSE + sbase + q_row, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + sbase + q_row, mask=q_ok, other=0.0)

    # [BQ] window starts, and the rpb offset of each query (its key's part is added per chunk)
    sx = _win_start(qx, X, border, KS)
    sy = _win_start(qy, Y, border, KS)
    q_boff = h * P * P + (KS - 1) * P + (KS - 1) - (qx * P + qy)
    hx0, hx1 = _halo(x0, tl.minimum(x0 + TILE_X, X) - 1, X, border, KS)
    hy0, hy1 = _halo(y0, tl.minimum(y0 + TILE_Y, Y) - 1, Y, border, KS)
    hw = hy1 - hy0
    n_halo = (hx1 - hx0) * hw

    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_halo
        kx = hx0 + offs_n // hw
        ky = hy0 + offs_n % hw
        on_map = n_ok & (kx >= 0) & (kx < X) & (ky >= 0) & (ky < Y)
        k_row = tl.where(on_map, kx * Y + ky, 0)
        kv_mask = on_map[:, None] & d_ok[None, :]
        # [BN, BD]
        k = tl.load(Kb + k_row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(Vb + k_row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        # [BQ, BD] @ [BD, BN] -> [BQ, BN]
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        key_ok = n_ok & (on_map | (border != 1))
        dx = kx[None, :] - sx[:, None]
        dy = ky[None, :] - sy[:, None]
        member = (dx >= 0) & (dx < KS) & (dy >= 0) & (dy < KS) & key_ok[None, :] & q_ok[:, None]
        if HAS_RPB:
            b_off = q_boff[:, None] + (kx * P + ky)[None, :]
            bias = tl.load(RPB + b_off, mask=member, other=0.0).to(tl.float32)
            s += bias * 1.4426950408889634
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        # [BQ, BD] @ [BD, BN] -> [BQ, BN]
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        # gradient of the natural-log logit q.k*scale + rpb
        ds = p * (dp - delta[:, None])
        # [BQ, BN] @ [BN, BD] -> [BQ, BD]; zero keys of zero mode add nothing here
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        if HAS_RPB:
            # zero-mode off-map pairs are members too: their bias gets its gradient here
            tl.atomic_add(DRPB + b_off, ds, mask=member)

    tl.store(DQb + q_row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit(do_not_specialize=["X", "Y", "D8", "border"])
def _na2d_bwd_dkdv_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    X, Y, H, D8, border, qk_scale, scale,
    KS: tl.constexpr, HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr, TILE_Y: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_K: tl.constexpr = TILE_X * TILE_Y
    P: tl.constexpr = 2 * KS - 1
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    n_ty = tl.cdiv(Y, TILE_Y)
    x0 = (pid // n_ty) * TILE_X
    y0 = (pid % n_ty) * TILE_Y
    # D8 = D / 8 makes every row a multiple of 16 bytes; with the launcher's 16-byte aligned
    # tensors, each (batch, head) slice is aligned too and the row loads vectorise
    D = D8 * 8
    base = bh.to(tl.int64) * X * Y * D
    Qb = tl.multiple_of(Q + base, 16)
    Kb = tl.multiple_of(K + base, 16)
    Vb = tl.multiple_of(V + base, 16)
    DOb = tl.multiple_of(DO + base, 16)
    DKb = tl.multiple_of(DK + base, 16)
    DVb = tl.multiple_of(DV + base, 16)
    sbase = bh.to(tl.int64) * X * Y

    offs_k = tl.arange(0, BLOCK_K)
    kx = x0 + offs_k // TILE_Y
    ky = y0 + offs_k % TILE_Y
    k_ok = (kx < X) & (ky < Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_row = tl.where(k_ok, kx * Y + ky, 0)
    kd_mask = k_ok[:, None] & d_ok[None, :]
    # [BK, BD]
    k = tl.load(Kb + k_row[:, None] * D + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(Vb + k_row[:, None] * D + offs_d[None, :], mask=kd_mask, other=0.0)

    k_boff = h * P * P + (KS - 1) * P + (KS - 1) + (kx * P + ky)
    ix0, ix1 = _inverse_halo(x0, tl.minimum(x0 + TILE_X, X) - 1, X, border, KS)
    iy0, iy1 = _inverse_halo(y0, tl.minimum(y0 + TILE_Y, Y) - 1, Y, border, KS)
    hw = iy1 - iy0
    n_halo = (ix1 - ix0) * hw

    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_halo
        qx = ix0 + offs_n // hw
        qy = iy0 + offs_n % hw
        q_row = tl.where(n_ok, qx * Y + qy, 0)
        qd_mask = n_ok[:, None] & d_ok[None, :]
        # [BN, BD]
        q = tl.load(Qb + q_row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DOb + q_row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        # [BN]
        lse2 = tl.load(LSE + sbase + q_row, mask=n_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + sbase + q_row, mask=n_ok, other=0.0)
        # [BK, BD] @ [BD, BN] -> [BK, BN]: transposed scores, one column per query
        st = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        # [BN] window starts of the chunk's queries: the same test as the forward's
        sx = _win_start(qx, X, border, KS)
        sy = _win_start(qy, Y, border, KS)
        dx = kx[:, None] - sx[None, :]
        dy = ky[:, None] - sy[None, :]
        member = (dx >= 0) & (dx < KS) & (dy >= 0) & (dy < KS) & n_ok[None, :] & k_ok[:, None]
        if HAS_RPB:
            bias = tl.load(RPB + (k_boff[:, None] - (qx * P + qy)[None, :]), mask=member, other=0.0).to(tl.float32)
            st += bias * 1.4426950408889634
        pt = tl.where(member, tl.exp2(st - lse2[None, :]), 0.0)
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        # [BK, BD] @ [BD, BN] -> [BK, BN]
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        dst = pt * (dpt - delta[None, :])
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")

    tl.store(DKb + k_row[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DVb + k_row[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)


# ----------------------------------------------------------------------------- launch choices


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


_CFG_KEYS = ("TILE_X", "TILE_Y", "BLOCK_N", "num_warps", "num_stages")

# (fp32?, BLOCK_D) -> (forward, backward) as (TILE_X, TILE_Y, BLOCK_N, num_warps, num_stages).
# Chosen by compiling every entry for sm_80/sm_90 and reading ptxas: the largest tiles that do
# not spill. The [rows, BLOCK_N] (query, key) tiles carry window tests and rpb gathers besides
# the scores; the backward holds four [rows, D] tiles at once, so it takes smaller tiles, and
# fp32 at D >= 64 drops the second pipeline stage (shared memory) and shrinks the key chunk.
_CONFIGS = {
    (False, 16): ((8, 8, 32, 8, 2), (8, 8, 32, 8, 2)),
    (False, 32): ((8, 8, 32, 8, 2), (8, 8, 32, 8, 2)),
    (False, 64): ((8, 8, 32, 8, 2), (4, 8, 32, 4, 2)),
    (False, 128): ((8, 8, 32, 8, 2), (4, 8, 32, 4, 2)),
    (True, 16): ((8, 8, 32, 8, 2), (4, 8, 32, 4, 2)),
    (True, 32): ((4, 8, 32, 8, 2), (4, 8, 16, 4, 2)),  # 8x8 spilled 16 B on sm_90 at KS 3 and 9
    (True, 64): ((4, 8, 32, 8, 1), (4, 8, 16, 4, 1)),
    (True, 128): ((2, 8, 32, 8, 1), (2, 8, 16, 4, 1)),
}


def launch_config(head_dim: int, dtype: torch.dtype) -> Dict[str, Dict[str, int]]:
    """Tile sizes, warps and stages of the forward and backward kernels for this head dim and
    dtype (a table by padded head dim, see ``_CONFIGS``). 8x8 query tiles with 32-position
    chunks put a 7x7 window's 14x14 halo in seven chunks."""
    bd = block_d(head_dim)
    fwd, bwd = _CONFIGS[(dtype == torch.float32, bd)]
    return {"fwd": dict(zip(_CFG_KEYS, fwd)), "bwd": dict(zip(_CFG_KEYS, bwd)), "BLOCK_D": bd}


def pack_config(config) -> List[int]:
    """The launch configuration as a flat int list (a custom-op argument)."""
    return [config["BLOCK_D"]] + [config[p][n] for p in ("fwd", "bwd") for n in _CFG_KEYS]


def unpack_config(values) -> Dict[str, object]:
    values = [int(x) for x in values]
    n = len(_CFG_KEYS)
    return {"BLOCK_D": values[0], "fwd": dict(zip(_CFG_KEYS, values[1:1 + n])),
            "bwd": dict(zip(_CFG_KEYS, values[1 + n:1 + 2 * n]))}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and starting on a 16-byte boundary as the kernels' load hints assume
    (allocations are; a view into one need not be)."""
    t = t.contiguous()
    if (t.storage_offset() * t.element_size()) % 16 != 0:
        t = t.clone()
    return t


def _launch(kernel, grid, args, consts, cfg):
    from torch.library import wrap_triton

    wrap_triton(kernel)[grid](*args, **consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _tiles(X: int, Y: int, cfg: Dict[str, int]) -> int:
    return triton.cdiv(X, cfg["TILE_X"]) * triton.cdiv(Y, cfg["TILE_Y"])


def _check(q, kernel_size: int, border: str) -> None:
    D = q.shape[-1]
    if not (16 <= D <= 128 and D % 8 == 0):
        raise ValueError(f"the Triton neighborhood kernels take head dims 16..128 in steps of 8, got {D}")
    if border not in BORDER_CODES:
        raise ValueError(f"border must be one of {tuple(BORDER_CODES)}, got {border!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")


def na2d_fwd(q, k, v, rpb, kernel_size: int, border: str, scale: float,
             config=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, X, Y, D] (dtype of q) and lse [B, H, X, Y] (fp32, natural log)."""
    _check(q, kernel_size, border)
    B, H, X, Y, D = q.shape
    config = config or launch_config(D, q.dtype)
    cfg = config["fwd"]
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    rpb_t = rpb.contiguous() if rpb is not None else q
    out = torch.empty_like(q)
    lse = torch.empty((B, H, X, Y), device=q.device, dtype=torch.float32)
    grid = (_tiles(X, Y, cfg), B * H)
    _launch(
        _na2d_fwd_kernel, grid,
        (q, k, v, rpb_t, out, lse, X, Y, H, D // 8, BORDER_CODES[border], float(scale) * _LOG2E),
        dict(KS=kernel_size, HAS_RPB=rpb is not None, TILE_X=cfg["TILE_X"], TILE_Y=cfg["TILE_Y"],
             BLOCK_N=cfg["BLOCK_N"], BLOCK_D=config["BLOCK_D"]),
        cfg)
    return out, lse


def na2d_bwd(dout, q, k, v, rpb, out, lse, kernel_size: int, border: str, scale: float,
             config=None, need_drpb: bool = True, dlse=None):
    """(dq, dk, dv, drpb) with drpb [H, 2k-1, 2k-1] in the dtype of rpb, or None without rpb
    (or when not needed). ``dlse``: optional gradient arriving on the lse output."""
    _check(q, kernel_size, border)
    B, H, X, Y, D = q.shape
    config = config or launch_config(D, q.dtype)
    cfg, bd = config["bwd"], config["BLOCK_D"]
    q, k, v, out, dout = (_aligned(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    has_rpb = rpb is not None
    rpb_t = rpb.contiguous() if has_rpb else q
    n = B * H * X * Y
    delta = torch.empty((B, H, X, Y), device=q.device, dtype=torch.float32)
    _launch(_na2d_bwd_delta_kernel, (triton.cdiv(n, 64),), (out, dout, delta, n, D // 8),
            dict(BLOCK_M=64, BLOCK_D=bd), dict(num_warps=4, num_stages=1))
    if dlse is not None:
        # d lse / d logit = p, so a gradient on lse enters every ds exactly like -delta
        delta = delta - dlse.to(torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    P = 2 * kernel_size - 1
    # atomics accumulate, so this one buffer starts at zero; a frozen rpb still gets it
    # computed (and dropped) so that no further kernel variant exists
    drpb = torch.zeros((H, P, P), device=q.device, dtype=torch.float32) if has_rpb else delta
    grid = (_tiles(X, Y, cfg), B * H)
    bc, qk_scale = BORDER_CODES[border], float(scale) * _LOG2E
    tiles = dict(TILE_X=cfg["TILE_X"], TILE_Y=cfg["TILE_Y"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd)
    _launch(_na2d_bwd_dq_kernel, grid,
            (q, k, v, rpb_t, dout, lse, delta, dq, drpb, X, Y, H, D // 8, bc, qk_scale, float(scale)),
            dict(KS=kernel_size, HAS_RPB=has_rpb, **tiles), cfg)
    _launch(_na2d_bwd_dkdv_kernel, grid,
            (q, k, v, rpb_t, dout, lse, delta, dk, dv, X, Y, H, D // 8, bc, qk_scale, float(scale)),
            dict(KS=kernel_size, HAS_RPB=has_rpb, **tiles), cfg)
    return dq, dk, dv, (drpb.to(rpb.dtype) if has_rpb and need_drpb else None)


# ----------------------------------------------------------------------------- AOT


_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TILE_KEYS = ("TILE_X", "TILE_Y", "BLOCK_N")


def _spec(name, kernel, sig, consts, cfg, label) -> KernelSpec:
    # the compiler reads the signature positionally: put it in the kernel's argument order
    sig = {n: sig[n] for n in kernel.arg_names}
    return KernelSpec(name, kernel, sig, consts, cfg["num_warps"], cfg["num_stages"], label=label)


def aot_specs(kernel_sizes=(7,)) -> List[KernelSpec]:
    """Every configuration the launchers can pick for fp16/bf16/fp32 and every BLOCK_D (16..128),
    with and without rpb, for the given kernel sizes. The border mode is a runtime argument, so
    one compile covers all three modes."""
    specs = []
    scalars = {"X": "i32", "Y": "i32", "H": "i32", "D8": "i32", "border": "i32", "qk_scale": "fp32", "scale": "fp32"}
    for dtype, tt in _TT.items():
        for bd in (16, 32, 64, 128):
            config = launch_config(bd, dtype)
            specs.append(_spec(
                "na2d_bwd_delta", _na2d_bwd_delta_kernel,
                {"O": f"*{tt}", "DO": f"*{tt}", "DELTA": "*fp32", "N": "i32", "D8": "i32",
                 "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                {"BLOCK_M": 64, "BLOCK_D": bd}, {"num_warps": 4, "num_stages": 1}, {"dtype": tt, "BLOCK_D": bd}))
            for ks in kernel_sizes:
                for has_rpb in (False, True):
                    for name, kernel, part in (("na2d_fwd", _na2d_fwd_kernel, "fwd"),
                                               ("na2d_bwd_dq", _na2d_bwd_dq_kernel, "bwd"),
                                               ("na2d_bwd_dkdv", _na2d_bwd_dkdv_kernel, "bwd")):
                        cfg = config[part]
                        consts = {"KS": ks, "HAS_RPB": has_rpb, "BLOCK_D": bd,
                                  **{n: cfg[n] for n in _TILE_KEYS}}
                        consts = {n: c for n, c in consts.items() if n in kernel.arg_names}
                        sig = {n: ("*fp32" if n in ("LSE", "DELTA", "DRPB") else f"*{tt}") for n in kernel.arg_names}
                        sig.update({n: t for n, t in scalars.items() if n in sig})
                        sig.update({n: "constexpr" for n in consts})
                        label = {"dtype": tt, "BLOCK_D": bd, "KS": ks, "rpb": has_rpb,
                                 "tile": f"{cfg['TILE_X']}x{cfg['TILE_Y']}", "BLOCK_N": cfg["BLOCK_N"]}
                        specs.append(_spec(name, kernel, sig, consts, cfg, label))
    return specs
