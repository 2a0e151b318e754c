"""2-D neighborhood attention in Triton: tiled forward and backward (docs/contract.md, neighborhood_attention2d).

Layout [B, H, X, Y, D], read and written through the strides of every dimension (any view:
heads-last, channels-first, fused-qkv slices); outputs and gradients take the dim order of their
input (``empty_in_order_of``: out and dq like q, dk like k, dv like v), so a caller's layout
comes back without a copy; lse and delta are contiguous [B, H, X, Y]. One program takes a
TILE_X x TILE_Y tile of pixels of one (batch, head) and one dilation sub-grid, flattened to
BLOCK_Q rows, and walks the union of the tile's windows (the halo, at most
(TILE_X + k - 1) x (TILE_Y + k - 1) positions of the sub-grid) in flat chunks of BLOCK_N
positions with an online softmax. Every (query, key) pair of a chunk is kept or dropped by the
exact window test of the border mode, so the same code serves all three modes (coordinates on
the query's sub-grid, see "Dilation" below):

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
Dilation d: the map splits into d x d interleaved sub-grids; a program's queries and their keys
lie on one sub-grid, where every rule above holds in sub-grid coordinates (see "Dilation" below).
Head dims are 16..128 in steps of 8 (padded to BLOCK_D, a power of two, with masks). No alignment
is assumed: Triton's launcher specialises what holds (16-byte aligned pointers, strides divisible
by 16, a unit head-dim stride); the AOT specs compile the unit-stride form and, with rpb, the general
form. Scores are kept in log2 units (scale and rpb pre-multiplied by log2 e) so the softmax runs
on exp2.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from . import _common as C
from ._aot import KernelSpec
from ._common import BLOCK_DS, BORDERS, TRITON_DTYPES, Launch, block_d, border_code
from ._constexpr import BORDER_CLAMP, BORDER_MASK, LN2, LOG2E
from ._device import on_device_of
from ._layout import empty_in_order_of


# ----------------------------------------------------------------------------- helpers
#
# Dilation. With dilation d an axis of length n splits into d interleaved sub-grids (residue
# g = i % d, positions g, g + d, ..., n_g = ceil((n - g) / d) of them), and a query's window holds
# keys of its own sub-grid only, at sub-grid coordinates that follow the dilation-1 rule on an
# axis of length n_g: zero/mask take [j - r, j + r] (off the sub-grid = off the map), clamp
# clamps the start into [0, n_g - k], and the rpb index (key - query) / d + k - 1 is the sub-grid
# coordinate difference + k - 1. So every program works on one (gx, gy) sub-grid pair, in
# sub-grid coordinates, with tiles and halos exactly those of dilation 1; only addresses map back
# to positions g + d * j. Dilation 1 is one sub-grid, the plain map.
#
# Layouts. Every [B, H, X, Y, D] tensor comes with its five strides (any view: heads-last,
# channels-first, fused-qkv slices); rows are gathered and outputs scattered through them, never
# copied. A unit head-dim stride is specialised by Triton's launcher (a stride equal to 1 becomes
# a constant).


@triton.jit
def _program_tile(pid, X, Y, dil, TILE_X: tl.constexpr, TILE_Y: tl.constexpr):
    """This program's sub-grid residues (gx, gy), sub-grid lengths (nx, ny), tile origin
    (x0, y0) and the sub-grid coordinates (jx, jy) of its TILE_X*TILE_Y rows with their validity.
    Program ids enumerate dil*dil sub-grids, each cut into tiles of the longest sub-grid's size
    (a shorter sub-grid leaves a tile empty: no row valid, no halo)."""
    BLOCK: tl.constexpr = TILE_X * TILE_Y
    n_tx = tl.cdiv(tl.cdiv(X, dil), TILE_X)
    n_ty = tl.cdiv(tl.cdiv(Y, dil), TILE_Y)
    g = pid // (n_tx * n_ty)
    t = pid % (n_tx * n_ty)
    gx = g // dil
    gy = g % dil
    nx = tl.cdiv(X - gx, dil)
    ny = tl.cdiv(Y - gy, dil)
    x0 = (t // n_ty) * TILE_X
    y0 = (t % n_ty) * TILE_Y
    offs = tl.arange(0, BLOCK)
    jx = x0 + offs // TILE_Y
    jy = y0 + offs % TILE_Y
    ok = (jx < nx) & (jy < ny)
    return gx, gy, nx, ny, x0, y0, jx, jy, ok


@triton.jit
def _bh_base(bh, H, s_b, s_h):
    """64-bit offset of (batch, head) ``bh`` in a tensor with batch/head strides s_b, s_h."""
    return (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h


@triton.jit
def _row_ptrs(base, px, py, s_x, s_y, s_d, offs_d):
    """[rows, BD] element pointers of map positions (px, py) through the tensor's strides."""
    return base + (px * s_x + py * s_y)[:, None] + offs_d[None, :] * s_d


@triton.jit
def _win_start(i, n, border, KS: tl.constexpr):
    """First key coordinate of the window of query coordinate(s) i on an axis of length n."""
    # clamp shifts the window inside the axis (n >= KS is checked by the op); the other modes
    # get bounds that never bind, so no branch splits the vector code
    lo = tl.where(border == BORDER_CLAMP, 0, -(1 << 30))
    hi = tl.where(border == BORDER_CLAMP, n - KS, 1 << 30)
    return tl.minimum(tl.maximum(i - KS // 2, lo), hi)


@triton.jit
def _halo(a, b, n, border, KS: tl.constexpr):
    """[lo, hi) key coordinates that the windows of query coordinates a..b (inclusive) cover."""
    lo = _win_start(a, n, border, KS)
    hi = _win_start(b, n, border, KS) + KS
    if border == BORDER_MASK:
        # mask mode: off-map positions never enter the softmax, so they need not be visited
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(hi, n)
    return lo, hi


@triton.jit
def _inverse_halo(a, b, n, border, KS: tl.constexpr):
    """[lo, hi) query coordinates whose window holds a key among coordinates a..b (inclusive)."""
    r = KS // 2
    lo = a - r
    hi = b + r + 1
    if border == BORDER_CLAMP:
        # clamp: queries near the edge share the edge window, so the edge keys are seen by up
        # to k + r queries on that side
        lo = tl.where(a <= KS - 1, 0, a - r)
        hi = tl.where(b >= n - KS, n, b + r + 1)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, n)
    return lo, hi


@triton.jit
def _tile_halo(
    x0, y0, nx, ny, border, KS: tl.constexpr, TILE_X: tl.constexpr, TILE_Y: tl.constexpr, INVERSE: tl.constexpr
):
    """The tile's halo on its sub-grid as (lo_x, lo_y, width, size): the keys its queries'
    windows cover (INVERSE: the queries whose windows cover its keys); size 0 for an empty tile."""
    bx = tl.minimum(x0 + TILE_X, nx) - 1
    by = tl.minimum(y0 + TILE_Y, ny) - 1
    if INVERSE:
        lx, hx = _inverse_halo(x0, bx, nx, border, KS)
        ly, hy = _inverse_halo(y0, by, ny, border, KS)
    else:
        lx, hx = _halo(x0, bx, nx, border, KS)
        ly, hy = _halo(y0, by, ny, border, KS)
    hw = tl.maximum(hy - ly, 0)
    size = tl.where((x0 < nx) & (y0 < ny), tl.maximum(hx - lx, 0) * hw, 0)
    return lx, ly, hw, size


@triton.jit
def _halo_chunk(start, lx, ly, hw, size, nx, ny, BLOCK_N: tl.constexpr):
    """Sub-grid coordinates of halo positions start..start+BLOCK_N, whether each is a halo
    position, and whether it is on the map."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < size
    cx = lx + offs_n // hw
    cy = ly + offs_n % hw
    on_map = n_ok & (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny)
    return cx, cy, n_ok, on_map


@triton.jit
def _member(kx, ky, sx, sy, KS: tl.constexpr):
    """Whether key coordinates (kx, ky) lie in the windows starting at (sx, sy) (broadcast)."""
    dx = kx - sx
    dy = ky - sy
    return (dx >= 0) & (dx < KS) & (dy >= 0) & (dy < KS)


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["X", "Y", "D", "dil", "border"])
def _na2d_fwd_kernel(
    Q,
    K,
    V,
    RPB,
    O,
    LSE,
    sq_b,
    sq_h,
    sq_x,
    sq_y,
    sq_d,
    sk_b,
    sk_h,
    sk_x,
    sk_y,
    sk_d,
    sv_b,
    sv_h,
    sv_x,
    sv_y,
    sv_d,
    so_b,
    so_h,
    so_x,
    so_y,
    so_d,
    X,
    Y,
    H,
    D,
    dil,
    border,
    qk_scale,
    KS: tl.constexpr,
    HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr,
    TILE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    P: tl.constexpr = 2 * KS - 1
    bh = tl.program_id(1)
    h = bh % H
    gx, gy, nx, ny, x0, y0, qjx, qjy, q_ok = _program_tile(tl.program_id(0), X, Y, dil, TILE_X, TILE_Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qpx = gx + dil * qjx
    qpy = gy + dil * qjy
    qd_mask = q_ok[:, None] & d_ok[None, :]
    Kb = K + _bh_base(bh, H, sk_b, sk_h)
    Vb = V + _bh_base(bh, H, sv_b, sv_h)
    # [BQ, BD]
    q = tl.load(_row_ptrs(Q + _bh_base(bh, H, sq_b, sq_h), qpx, qpy, sq_x, sq_y, sq_d, offs_d), mask=qd_mask, other=0.0)

    # [BQ] window starts, and the rpb offset of each query (its key's part is added per chunk)
    sx = _win_start(qjx, nx, border, KS)
    sy = _win_start(qjy, ny, border, KS)
    q_boff = h * P * P + (KS - 1) * P + (KS - 1) - (qjx * P + qjy)
    lx, ly, hw, n_halo = _tile_halo(x0, y0, nx, ny, border, KS, TILE_X, TILE_Y, False)

    # Finite start so a chunk where a row has no member gives alpha = 1, not NaN.
    m_i = tl.full([TILE_X * TILE_Y], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([TILE_X * TILE_Y], dtype=tl.float32)
    acc = tl.zeros([TILE_X * TILE_Y, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        kjx, kjy, n_ok, on_map = _halo_chunk(start, lx, ly, hw, n_halo, nx, ny, BLOCK_N)
        kpx = tl.where(on_map, gx + dil * kjx, 0)
        kpy = tl.where(on_map, gy + dil * kjy, 0)
        kv_mask = on_map[:, None] & d_ok[None, :]
        # [BN, BD]; off-map rows load as the zero keys/values of zero mode
        k = tl.load(_row_ptrs(Kb, kpx, kpy, sk_x, sk_y, sk_d, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_row_ptrs(Vb, kpx, kpy, sv_x, sv_y, sv_d, offs_d), mask=kv_mask, other=0.0)
        # [BQ, BD] @ [BD, BN] -> [BQ, BN], in log2 units
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        # mask mode leaves off-map keys out; zero mode keeps them as zero keys
        key_ok = n_ok & (on_map | (border != BORDER_MASK))
        member = _member(kjx[None, :], kjy[None, :], sx[:, None], sy[:, None], KS) & key_ok[None, :]
        if HAS_RPB:
            # [BQ, BN] gather from the [P, P] table of this head
            bias = tl.load(RPB + (q_boff[:, None] + (kjx * P + kjy)[None, :]), mask=member, other=0.0).to(tl.float32)
            s += bias * LOG2E
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
    # out [B, H, X, Y, D] through its strides; lse [B, H, X, Y] contiguous
    tl.store(
        _row_ptrs(O + _bh_base(bh, H, so_b, so_h), qpx, qpy, so_x, so_y, so_d, offs_d),
        out.to(O.dtype.element_ty),
        mask=qd_mask,
    )
    lse = (m_i + tl.log2(l_safe)) * LN2
    q_row = tl.where(q_ok, qpx * Y + qpy, 0)
    tl.store(LSE + bh.to(tl.int64) * X * Y + q_row, lse, mask=q_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["X", "Y", "D"])
def _na2d_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    so_b,
    so_h,
    so_x,
    so_y,
    so_d,
    sdo_b,
    sdo_h,
    sdo_x,
    sdo_y,
    sdo_d,
    X,
    Y,
    H,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) for BLOCK_M positions of one (batch, head); delta is contiguous."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < X * Y
    px = tl.where(m_ok, offs_m // Y, 0)
    py = tl.where(m_ok, offs_m % Y, 0)
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    # [BM, BD]
    o = tl.load(_row_ptrs(O + _bh_base(bh, H, so_b, so_h), px, py, so_x, so_y, so_d, offs_d), mask=mask, other=0.0).to(
        tl.float32
    )
    do = tl.load(
        _row_ptrs(DO + _bh_base(bh, H, sdo_b, sdo_h), px, py, sdo_x, sdo_y, sdo_d, offs_d), mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * X * Y + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit(do_not_specialize=["X", "Y", "D", "dil", "border"])
def _na2d_bwd_dq_kernel(
    Q,
    K,
    V,
    RPB,
    DO,
    LSE,
    DELTA,
    DQ,
    DRPB,
    sq_b,
    sq_h,
    sq_x,
    sq_y,
    sq_d,
    sk_b,
    sk_h,
    sk_x,
    sk_y,
    sk_d,
    sv_b,
    sv_h,
    sv_x,
    sv_y,
    sv_d,
    sdo_b,
    sdo_h,
    sdo_x,
    sdo_y,
    sdo_d,
    sdq_b,
    sdq_h,
    sdq_x,
    sdq_y,
    sdq_d,
    X,
    Y,
    H,
    D,
    dil,
    border,
    qk_scale,
    scale,
    KS: tl.constexpr,
    HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr,
    TILE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    P: tl.constexpr = 2 * KS - 1
    bh = tl.program_id(1)
    h = bh % H
    gx, gy, nx, ny, x0, y0, qjx, qjy, q_ok = _program_tile(tl.program_id(0), X, Y, dil, TILE_X, TILE_Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qpx = gx + dil * qjx
    qpy = gy + dil * qjy
    qd_mask = q_ok[:, None] & d_ok[None, :]
    Kb = K + _bh_base(bh, H, sk_b, sk_h)
    Vb = V + _bh_base(bh, H, sv_b, sv_h)
    # [BQ, BD]
    q = tl.load(_row_ptrs(Q + _bh_base(bh, H, sq_b, sq_h), qpx, qpy, sq_x, sq_y, sq_d, offs_d), mask=qd_mask, other=0.0)
    do = tl.load(
        _row_ptrs(DO + _bh_base(bh, H, sdo_b, sdo_h), qpx, qpy, sdo_x, sdo_y, sdo_d, offs_d), mask=qd_mask, other=0.0
    )
    # [BQ]; lse and delta are contiguous
    q_row = tl.where(q_ok, qpx * Y + qpy, 0)
    sbase = bh.to(tl.int64) * X * Y
    lse2 = tl.load(LSE + sbase + q_row, mask=q_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + sbase + q_row, mask=q_ok, other=0.0)

    # [BQ] window starts, and the rpb offset of each query (its key's part is added per chunk)
    sx = _win_start(qjx, nx, border, KS)
    sy = _win_start(qjy, ny, border, KS)
    q_boff = h * P * P + (KS - 1) * P + (KS - 1) - (qjx * P + qjy)
    lx, ly, hw, n_halo = _tile_halo(x0, y0, nx, ny, border, KS, TILE_X, TILE_Y, False)

    dq = tl.zeros([TILE_X * TILE_Y, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        kjx, kjy, n_ok, on_map = _halo_chunk(start, lx, ly, hw, n_halo, nx, ny, BLOCK_N)
        kpx = tl.where(on_map, gx + dil * kjx, 0)
        kpy = tl.where(on_map, gy + dil * kjy, 0)
        kv_mask = on_map[:, None] & d_ok[None, :]
        # [BN, BD]
        k = tl.load(_row_ptrs(Kb, kpx, kpy, sk_x, sk_y, sk_d, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_row_ptrs(Vb, kpx, kpy, sv_x, sv_y, sv_d, offs_d), mask=kv_mask, other=0.0)
        # [BQ, BD] @ [BD, BN] -> [BQ, BN]
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        key_ok = n_ok & (on_map | (border != BORDER_MASK))
        member = _member(kjx[None, :], kjy[None, :], sx[:, None], sy[:, None], KS) & key_ok[None, :] & q_ok[:, None]
        if HAS_RPB:
            b_off = q_boff[:, None] + (kjx * P + kjy)[None, :]
            bias = tl.load(RPB + b_off, mask=member, other=0.0).to(tl.float32)
            s += bias * LOG2E
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

    tl.store(
        _row_ptrs(DQ + _bh_base(bh, H, sdq_b, sdq_h), qpx, qpy, sdq_x, sdq_y, sdq_d, offs_d),
        (dq * scale).to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


@triton.jit(do_not_specialize=["X", "Y", "D", "dil", "border"])
def _na2d_bwd_dkdv_kernel(
    Q,
    K,
    V,
    RPB,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    sq_b,
    sq_h,
    sq_x,
    sq_y,
    sq_d,
    sk_b,
    sk_h,
    sk_x,
    sk_y,
    sk_d,
    sv_b,
    sv_h,
    sv_x,
    sv_y,
    sv_d,
    sdo_b,
    sdo_h,
    sdo_x,
    sdo_y,
    sdo_d,
    sdk_b,
    sdk_h,
    sdk_x,
    sdk_y,
    sdk_d,
    sdv_b,
    sdv_h,
    sdv_x,
    sdv_y,
    sdv_d,
    X,
    Y,
    H,
    D,
    dil,
    border,
    qk_scale,
    scale,
    KS: tl.constexpr,
    HAS_RPB: tl.constexpr,
    TILE_X: tl.constexpr,
    TILE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    P: tl.constexpr = 2 * KS - 1
    bh = tl.program_id(1)
    h = bh % H
    gx, gy, nx, ny, x0, y0, kjx, kjy, k_ok = _program_tile(tl.program_id(0), X, Y, dil, TILE_X, TILE_Y)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kpx = gx + dil * kjx
    kpy = gy + dil * kjy
    kd_mask = k_ok[:, None] & d_ok[None, :]
    Qb = Q + _bh_base(bh, H, sq_b, sq_h)
    DOb = DO + _bh_base(bh, H, sdo_b, sdo_h)
    # [BK, BD]
    k = tl.load(_row_ptrs(K + _bh_base(bh, H, sk_b, sk_h), kpx, kpy, sk_x, sk_y, sk_d, offs_d), mask=kd_mask, other=0.0)
    v = tl.load(_row_ptrs(V + _bh_base(bh, H, sv_b, sv_h), kpx, kpy, sv_x, sv_y, sv_d, offs_d), mask=kd_mask, other=0.0)
    sbase = bh.to(tl.int64) * X * Y

    k_boff = h * P * P + (KS - 1) * P + (KS - 1) + (kjx * P + kjy)
    lx, ly, hw, n_halo = _tile_halo(x0, y0, nx, ny, border, KS, TILE_X, TILE_Y, True)

    dk = tl.zeros([TILE_X * TILE_Y, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TILE_X * TILE_Y, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_halo, BLOCK_N):
        # the inverse halo lies on the map: n_ok and on_map agree
        qjx, qjy, n_ok, _ = _halo_chunk(start, lx, ly, hw, n_halo, nx, ny, BLOCK_N)
        qpx = tl.where(n_ok, gx + dil * qjx, 0)
        qpy = tl.where(n_ok, gy + dil * qjy, 0)
        qd_mask = n_ok[:, None] & d_ok[None, :]
        # [BN, BD]
        q = tl.load(_row_ptrs(Qb, qpx, qpy, sq_x, sq_y, sq_d, offs_d), mask=qd_mask, other=0.0)
        do = tl.load(_row_ptrs(DOb, qpx, qpy, sdo_x, sdo_y, sdo_d, offs_d), mask=qd_mask, other=0.0)
        # [BN]
        q_row = qpx * Y + qpy
        lse2 = tl.load(LSE + sbase + q_row, mask=n_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + sbase + q_row, mask=n_ok, other=0.0)
        # [BK, BD] @ [BD, BN] -> [BK, BN]: transposed scores, one column per query
        st = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        # [BN] window starts of the chunk's queries: the same test as the forward's
        sx = _win_start(qjx, nx, border, KS)
        sy = _win_start(qjy, ny, border, KS)
        member = _member(kjx[:, None], kjy[:, None], sx[None, :], sy[None, :], KS) & n_ok[None, :] & k_ok[:, None]
        if HAS_RPB:
            bias = tl.load(RPB + (k_boff[:, None] - (qjx * P + qjy)[None, :]), mask=member, other=0.0).to(tl.float32)
            st += bias * LOG2E
        pt = tl.where(member, tl.exp2(st - lse2[None, :]), 0.0)
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        # [BK, BD] @ [BD, BN] -> [BK, BN]
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        dst = pt * (dpt - delta[None, :])
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")

    # dk, dv [B, H, X, Y, D] through their strides
    tl.store(
        _row_ptrs(DK + _bh_base(bh, H, sdk_b, sdk_h), kpx, kpy, sdk_x, sdk_y, sdk_d, offs_d),
        (dk * scale).to(DK.dtype.element_ty),
        mask=kd_mask,
    )
    tl.store(
        _row_ptrs(DV + _bh_base(bh, H, sdv_b, sdv_h), kpx, kpy, sdv_x, sdv_y, sdv_d, offs_d),
        dv.to(DV.dtype.element_ty),
        mask=kd_mask,
    )


# ----------------------------------------------------------------------------- launch choices


# (fp32?, BLOCK_D) -> (forward, backward) as (TILE_X, TILE_Y, BLOCK_N, num_warps, num_stages).
# Chosen by compiling every entry for sm_80/sm_90 and reading ptxas: the largest tiles that do
# not spill. The [rows, BLOCK_N] (query, key) tiles carry window tests and rpb gathers besides
# the scores; the backward holds four [rows, D] tiles at once, so it takes smaller tiles, and
# fp32 at D >= 64 drops the second pipeline stage (shared memory) and shrinks the key chunk.
_CONFIGS = {
    (False, 16): ((8, 8, 32, 8, 2), (8, 8, 32, 8, 2)),
    (False, 32): ((8, 8, 32, 8, 2), (8, 8, 32, 8, 2)),
    (False, 64): ((8, 8, 32, 8, 2), (4, 8, 16, 4, 2)),  # 32-key chunks spilled 8 B (dk/dv, sm_80)
    # backward: 4 and 8 warps (2x8 or 4x8 tiles, 16- or 32-key chunks) spilled 8-32 B once the
    # gradients were written through their strides (ptxas squeezing to 128 registers)
    (False, 128): ((8, 8, 32, 8, 2), (4, 8, 16, 16, 1)),
    (True, 16): ((8, 8, 32, 8, 2), (4, 8, 16, 4, 2)),  # 32-key chunks spilled 8-20 B in dq with rpb
    (True, 32): ((4, 8, 32, 8, 2), (4, 8, 16, 4, 2)),  # 8x8 spilled 16 B on sm_90 at KS 3 and 9
    # 32-key forward chunks / 4x8 dk/dv spilled 8-16 B; 8 forward warps, 8-24 B on sm_90 with the
    # output written through its strides
    (True, 64): ((4, 8, 16, 4, 1), (2, 8, 16, 4, 1)),
    (True, 128): ((2, 8, 32, 8, 1), (2, 8, 16, 4, 1)),
}


class Na2dConfig(NamedTuple):
    block_d: int
    fwd: Launch  # forward: a tile_x x tile_y query tile, its halo in chunks of block_n positions
    bwd: Launch  # dq (query tile) and dk/dv (key tile, inverse halo): the same tiles and chunks
    delta: Launch  # delta pre-pass: block_m positions


# the fields of the forward and backward launches in a packed configuration, in order
_PACKED = ("tile_x", "tile_y", "block_n", "num_warps", "num_stages")


def delta_block_m(bd: int) -> int:
    """Rows per program of the delta pre-pass: 16 elements of O and of dO per thread (4 warps)."""
    return max(16, 2048 // bd)


def _delta_launch(bd: int) -> Launch:
    return Launch(block_m=delta_block_m(bd), num_warps=4, num_stages=1)


def launch_config(head_dim: int, dtype: torch.dtype) -> Na2dConfig:
    """Tile sizes, warps and stages of the forward and backward kernels for this head dim and
    dtype (a table by padded head dim, see ``_CONFIGS``). 8x8 query tiles with 32-position
    chunks put a 7x7 window's 14x14 halo in seven chunks."""
    bd = block_d(head_dim)
    fwd, bwd = (Launch(**dict(zip(_PACKED, t))) for t in _CONFIGS[(dtype == torch.float32, bd)])
    return Na2dConfig(bd, fwd, bwd, _delta_launch(bd))


def pack_config(config: Na2dConfig) -> List[int]:
    """The launch configuration as a flat int list (a custom-op argument)."""
    return [config.block_d] + [getattr(launch, n) for launch in (config.fwd, config.bwd) for n in _PACKED]


def unpack_config(values) -> Na2dConfig:
    """The inverse of :func:`pack_config` (the delta pre-pass follows from BLOCK_D)."""
    values = [int(x) for x in values]
    n = len(_PACKED)
    fwd = Launch(**dict(zip(_PACKED, values[1 : 1 + n])))
    bwd = Launch(**dict(zip(_PACKED, values[1 + n : 1 + 2 * n])))
    return Na2dConfig(values[0], fwd, bwd, _delta_launch(values[0]))


def _launch(kernel, grid, args, consts, launch: Launch):
    from torch.library import wrap_triton

    with on_device_of(args[0]):  # the tensors' GPU, not the current one
        wrap_triton(kernel)[grid](*args, **consts, **launch.kwargs())


def _tiles(X: int, Y: int, dilation: int, launch: Launch) -> int:
    """Programs per (batch, head): dilation**2 sub-grids, each tiled as the longest one."""
    nx, ny = triton.cdiv(X, dilation), triton.cdiv(Y, dilation)
    return dilation * dilation * triton.cdiv(nx, launch.tile_x) * triton.cdiv(ny, launch.tile_y)


def _strides(*ts) -> List[int]:
    """The five strides of each [B, H, X, Y, D] tensor, in order (views are read in place)."""
    return [st for t in ts for st in t.stride()]


def _check(q, kernel_size: int, border: str, dilation: int) -> None:
    D = q.shape[-1]
    if not (16 <= D <= 128 and D % 8 == 0):
        raise ValueError(f"the Triton neighborhood kernels take head dims 16..128 in steps of 8, got {D}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def na2d_fwd(
    q, k, v, rpb, kernel_size: int, border: str, scale: float, config=None, dilation: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, X, Y, D] (dtype of q, in q's dim order) and lse [B, H, X, Y] (fp32, natural
    log, contiguous). q, k, v may be any strided views of [B, H, X, Y, D]; they are read in place."""
    _check(q, kernel_size, border, dilation)
    B, H, X, Y, D = q.shape
    config = config or launch_config(D, q.dtype)
    cfg = config.fwd
    rpb_t = rpb.contiguous() if rpb is not None else q
    out = empty_in_order_of(q)
    lse = torch.empty((B, H, X, Y), device=q.device, dtype=torch.float32)
    grid = (_tiles(X, Y, dilation, cfg), B * H)
    _launch(
        _na2d_fwd_kernel,
        grid,
        (
            q,
            k,
            v,
            rpb_t,
            out,
            lse,
            *_strides(q, k, v, out),
            X,
            Y,
            H,
            D,
            dilation,
            border_code(border),
            float(scale) * C.LOG2E,
        ),
        dict(KS=kernel_size, HAS_RPB=rpb is not None, BLOCK_D=config.block_d),
        cfg,
    )
    return out, lse


def na2d_bwd(
    dout,
    q,
    k,
    v,
    rpb,
    out,
    lse,
    kernel_size: int,
    border: str,
    scale: float,
    config=None,
    need_drpb: bool = True,
    dlse=None,
    dilation: int = 1,
):
    """(dq, dk, dv, drpb) with drpb [H, 2k-1, 2k-1] in the dtype of rpb, or None without rpb
    (or when not needed). ``dlse``: optional gradient arriving on the lse output. dout, q, k, v
    and out may be any strided views; dq, dk, dv take the dim order of q, k, v."""
    _check(q, kernel_size, border, dilation)
    B, H, X, Y, D = q.shape
    config = config or launch_config(D, q.dtype)
    cfg, bd = config.bwd, config.block_d
    lse = lse.contiguous()  # [B, H, X, Y] fp32 statistic, made by the forward (already contiguous)
    has_rpb = rpb is not None
    rpb_t = rpb.contiguous() if has_rpb else q
    delta = torch.empty((B, H, X, Y), device=q.device, dtype=torch.float32)
    _launch(
        _na2d_bwd_delta_kernel,
        (triton.cdiv(X * Y, config.delta.block_m), B * H),
        (out, dout, delta, *_strides(out, dout), X, Y, H, D),
        dict(BLOCK_D=bd),
        config.delta,
    )
    if dlse is not None:
        # d lse / d logit = p, so a gradient on lse enters every ds exactly like -delta
        delta = delta - dlse.to(torch.float32)
    dq, dk, dv = empty_in_order_of(q), empty_in_order_of(k), empty_in_order_of(v)
    P = 2 * kernel_size - 1
    # atomics accumulate, so this one buffer starts at zero; a frozen rpb still gets it
    # computed (and dropped) so that no further kernel variant exists
    drpb = torch.zeros((H, P, P), device=q.device, dtype=torch.float32) if has_rpb else delta
    grid = (_tiles(X, Y, dilation, cfg), B * H)
    bc, qk_scale = border_code(border), float(scale) * C.LOG2E
    strides = _strides(q, k, v, dout)
    scalars = (X, Y, H, D, dilation, bc, qk_scale, float(scale))
    _launch(
        _na2d_bwd_dq_kernel,
        grid,
        (q, k, v, rpb_t, dout, lse, delta, dq, drpb, *strides, *_strides(dq), *scalars),
        dict(KS=kernel_size, HAS_RPB=has_rpb, BLOCK_D=bd),
        cfg,
    )
    _launch(
        _na2d_bwd_dkdv_kernel,
        grid,
        (q, k, v, rpb_t, dout, lse, delta, dk, dv, *strides, *_strides(dk, dv), *scalars),
        dict(KS=kernel_size, HAS_RPB=has_rpb, BLOCK_D=bd),
        cfg,
    )
    return dq, dk, dv, (drpb.to(rpb.dtype) if has_rpb and need_drpb else None)


# ----------------------------------------------------------------------------- AOT


_SCALARS = {
    "X": "i32",
    "Y": "i32",
    "H": "i32",
    "D": "i32",
    "dil": "i32",
    "border": "i32",
    "qk_scale": "fp32",
    "scale": "fp32",
}
_STATS = ("LSE", "DELTA", "DRPB")  # fp32 buffers


def _spec(name, kernel, tt, consts, launch: Launch, label, unit_d) -> KernelSpec:
    """One configuration in the kernel's argument order. Strides are i32; ``unit_d``: the head-dim
    strides are 1, which Triton's launcher turns into constants (the common layouts), otherwise
    every stride is a runtime value (channels-first views)."""
    sig = {}
    consts = {n: c for n, c in {**consts, **launch.constexprs()}.items() if n in kernel.arg_names}
    for n in kernel.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in _SCALARS:
            sig[n] = _SCALARS[n]
        elif n[0].isupper():
            sig[n] = "*fp32" if n in _STATS else f"*{tt}"
        elif unit_d and n.startswith("s") and n.endswith("_d"):
            sig[n] = "constexpr"
            consts[n] = 1
        else:
            sig[n] = "i32"
    label = dict(label, layout="unit-d" if unit_d else "strided")
    return KernelSpec(name, kernel, sig, consts, **launch.options(), label=label)


def aot_specs(kernel_sizes=(7,)) -> List[KernelSpec]:
    """Every configuration the launchers can pick for fp16/bf16/fp32 and every BLOCK_D (16..128),
    with and without rpb, for the given kernel sizes, with unit head-dim strides (contiguous,
    heads-last and fused-qkv views); the rpb variants also with every stride a runtime value
    (channels-first views). Border mode and dilation are runtime arguments, so one compile
    covers all three modes and every dilation."""
    specs = []
    for dtype, tt in TRITON_DTYPES.items():
        for bd in BLOCK_DS:
            config = launch_config(bd, dtype)
            delta, label = config.delta, {"dtype": tt, "BLOCK_D": bd, "BLOCK_M": config.delta.block_m}
            for unit_d in (True, False):
                specs.append(_spec("na2d_bwd_delta", _na2d_bwd_delta_kernel, tt, {"BLOCK_D": bd}, delta, label, unit_d))
            for ks in kernel_sizes:
                for has_rpb in (False, True):
                    for name, kernel, cfg in (
                        ("na2d_fwd", _na2d_fwd_kernel, config.fwd),
                        ("na2d_bwd_dq", _na2d_bwd_dq_kernel, config.bwd),
                        ("na2d_bwd_dkdv", _na2d_bwd_dkdv_kernel, config.bwd),
                    ):
                        consts = {"KS": ks, "HAS_RPB": has_rpb, "BLOCK_D": bd}
                        label = {
                            "dtype": tt,
                            "BLOCK_D": bd,
                            "KS": ks,
                            "rpb": has_rpb,
                            "tile": f"{cfg.tile_x}x{cfg.tile_y}",
                            "BLOCK_N": cfg.block_n,
                        }
                        for unit_d in (True, False) if has_rpb else (True,):
                            specs.append(_spec(name, kernel, tt, consts, cfg, label, unit_d))
    return specs
