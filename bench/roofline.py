"""Roofline on paper for the Triton PWCA and neighborhood kernels on an H100: FLOPs, bytes, arithmetic
intensity and the occupancy implied by ptxas registers and shared memory of the chosen launches.

``python -m bench.kernel_report --roofline [--dtype float16 bfloat16]`` prints it; no GPU is needed.

Sizes: DCAL's PWCA (B 8, 785 queries over 785 + 785 keys, 12 heads, D 64) and the BEV
neighborhood attention (B 2, 256 x 256, 256 channels = 4 heads x D 64, k 7, with rpb).
The launch configuration of each kernel is read from the kernels' own launch helpers
(``pwca_config``, ``launch_config``), the grid from the launchers' rule, and the registers and
shared memory by compiling that configuration for sm_90 (:func:`dcal.testing.aot.compile_spec`).

Per kernel:
* useful FLOPs: the op's (PWCA: 4*Nq*Nk*D per head forward; neighborhood: 4*k*k*D per query and
  head; backward 2.5x, split dq kernel 1.5x + dk/dv kernel 1x; the delta pre-passes none);
  executed FLOPs: what the tiles compute, recomputation and masked-out tile entries included
  (the neighborhood kernels compute every (query, key) pair of a tile's halo chunks);
* bytes: compulsory (every tensor read or written once) and tiled (each program reads its tiles
  from HBM, no L2 reuse): the true traffic lies between;
* arithmetic intensity = useful FLOPs / bytes, against the ridge point 990e12 / 3.35e12 = 296 FLOP/B;
* time bounds: executed FLOPs at the dense tensor-core peak, and bytes at the HBM bandwidth;
* occupancy: CTAs per SM from registers (65536 per SM, allocated per warp in units of 256), shared
  memory (228 KiB per SM, 1 KiB reserved per CTA), threads (2048) and the 32-CTA limit; resident
  warps / 64, and the waves of the grid over 132 SMs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

H100 = dict(
    name="H100 SXM",
    tflops=990.0,
    tbps=3.35,
    smem_sm=228 * 1024,
    smem_reserved=1024,
    regs_sm=65536,
    sms=132,
    max_warps=64,
    max_ctas=32,
    max_threads=2048,
    cc=90,
)
DCAL = dict(B=8, H=12, NQ=785, NK1=785, NK2=785, D=64)
BEV = dict(B=2, H=4, X=256, Y=256, D=64, KS=7, rpb=True)


@dataclass
class Launch:
    """One kernel launch: what it computes and moves, how it is tiled, and its compiled resources."""

    op: str
    kernel: str
    grid: int
    num_warps: int
    num_stages: int
    constexprs: Dict[str, object]
    useful_flops: float
    exec_flops: float
    bytes_min: float
    bytes_tiled: float
    regs: Optional[int] = None
    smem: Optional[int] = None
    spills: Optional[int] = None


def occupancy(regs: int, smem: int, num_warps: int, gpu=H100) -> Dict[str, float]:
    """CTAs per SM and the limit that sets it, resident warps / max warps."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by = {
        "regs": (gpu["regs_sm"] // regs_per_warp) // num_warps,
        "smem": gpu["smem_sm"] // (smem + gpu["smem_reserved"]),
        "threads": gpu["max_threads"] // (32 * num_warps),
        "ctas": gpu["max_ctas"],
    }
    limit = min(by, key=by.get)
    ctas = by[limit]
    return {"ctas_per_sm": ctas, "limit": limit, "occupancy": ctas * num_warps / gpu["max_warps"]}


def _elt(dtype) -> int:
    return 2 if str(dtype).endswith(("float16", "bfloat16")) else 4


def pwca_launches(dtype, s=DCAL, cc: int = 90) -> List[Launch]:
    from dcal.kernels.pwca import pwca_config

    NQ, NK1, NK2, D = s["NQ"], s["NK1"], s["NK2"], s["D"]
    NK, e, BH = NK1 + NK2, _elt(dtype), s["B"] * s["H"]
    cfg = pwca_config(D, dtype, cc)
    bd = cfg.block_d
    qbytes, kvbytes = NQ * D * e, NK * D * e  # per (b, h)
    out = []
    t = cfg.fwd
    nq = math.ceil(NQ / t.block_m)
    f = 4.0 * NQ * NK * D * BH
    exec_f = 4.0 * nq * t.block_m * NK * bd * BH  # padded query rows and head dim computed too
    out.append(
        Launch(
            "pwca",
            "pwca_fwd",
            nq * BH,
            t.num_warps,
            t.num_stages,
            dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=bd, HAS_SEG2=True, DOT_PREC=cfg.dot_prec),
            f,
            exec_f,
            BH * (2 * qbytes + 2 * kvbytes + NQ * 4),
            BH * (2 * qbytes + nq * 2 * kvbytes + NQ * 4),
        )
    )
    t = cfg.pre
    out.append(
        Launch(
            "pwca",
            "pwca_bwd_preprocess",
            math.ceil(NQ / t.block_m) * BH,
            t.num_warps,
            t.num_stages,
            dict(BLOCK_M=t.block_m, BLOCK_D=bd, HAS_DLSE=False),
            0.0,
            2.0 * NQ * D * BH,
            BH * (2 * qbytes + NQ * 4),
            BH * (2 * qbytes + NQ * 4),
        )
    )
    t = cfg.dkdv
    for nk in (NK1, NK2):  # one launch per segment
        nkb = math.ceil(nk / t.block_n)
        seg = nk * D * e
        # per key block: recomputed S = QK^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q: 4 matmuls;
        # useful: dV and dK (S and dP are the dq kernel's), so fwd + bwd useful = 4 + 6 + 4 = 3.5x fwd
        out.append(
            Launch(
                "pwca",
                "pwca_bwd_dkdv",
                nkb * BH,
                t.num_warps,
                t.num_stages,
                dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=bd, DOT_PREC=cfg.dot_prec),
                4.0 * NQ * nk * D * BH,
                8.0 * NQ * nkb * t.block_n * bd * BH,
                BH * (2 * qbytes + NQ * 8 + 4 * seg),
                BH * (nkb * (2 * qbytes + NQ * 8) + 4 * seg),
            )
        )
    t = cfg.dq
    nq = math.ceil(NQ / t.block_m)
    out.append(
        Launch(
            "pwca",
            "pwca_bwd_dq",
            nq * BH,
            t.num_warps,
            t.num_stages,
            dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=bd, HAS_SEG2=True, DOT_PREC=cfg.dot_prec),
            6.0 * NQ * NK * D * BH,
            6.0 * nq * t.block_m * NK * bd * BH,
            BH * (3 * qbytes + NQ * 8 + 2 * kvbytes),
            BH * (3 * qbytes + NQ * 8 + nq * 2 * kvbytes),
        )
    )
    return out


def na2d_launches(dtype, s=BEV) -> List[Launch]:
    from dcal.kernels.na2d import delta_block_m, launch_config

    X, Y, D, KS = s["X"], s["Y"], s["D"], s["KS"]
    e, BH, n = _elt(dtype), s["B"] * s["H"], X * Y
    config = launch_config(D, dtype)
    bd = config.block_d
    mapbytes = n * D * e  # one [X, Y, D] map of one (b, h)
    out = []
    for part, kernels in (("fwd", ("na2d_fwd",)), ("bwd", ("na2d_bwd_dq", "na2d_bwd_dkdv"))):
        c = getattr(config, part)
        tx, ty, bn = c["TILE_X"], c["TILE_Y"], c["BLOCK_N"]
        tiles = math.ceil(X / tx) * math.ceil(Y / ty)
        halo = (tx + KS - 1) * (ty + KS - 1)
        chunks = math.ceil(halo / bn)
        pairs_exec = tiles * tx * ty * chunks * bn  # (query, key) pairs a program's dots compute
        consts = dict(KS=KS, HAS_RPB=s["rpb"], TILE_X=tx, TILE_Y=ty, BLOCK_N=bn, BLOCK_D=bd)
        for kernel in kernels:
            if kernel == "na2d_fwd":  # S = QK^T, O += PV
                mult, reads_min = 2, 3 * mapbytes + n * 4
                per_tile = tx * ty * D * e * 2 + halo * D * e * 2 + tx * ty * 4
            elif kernel == "na2d_bwd_dq":  # S, dP = dO V^T, dQ += dS K
                mult, reads_min = 3, 4 * mapbytes + n * 8
                per_tile = tx * ty * D * e * 3 + halo * D * e * 2 + tx * ty * 8
            else:  # S, dP, dV += P^T dO, dK += dS^T Q over the inverse neighbourhood
                mult, reads_min = 4, 5 * mapbytes + n * 8
                per_tile = tx * ty * D * e * 4 + halo * (D * e * 2 + 8)
            # useful: forward S and PV; backward 2.5x that, split as dq (S, dP, dQ) + dkdv (dV, dK);
            # the dkdv kernel's recomputed S and dP count as executed only
            useful = {"na2d_fwd": 4.0, "na2d_bwd_dq": 6.0, "na2d_bwd_dkdv": 4.0}[kernel] * KS * KS * D * n * BH
            out.append(
                Launch(
                    "neighborhood",
                    kernel,
                    tiles * BH,
                    c["num_warps"],
                    c["num_stages"],
                    dict(consts),
                    useful,
                    2.0 * mult * pairs_exec * bd * BH,
                    BH * reads_min,
                    BH * tiles * per_tile,
                )
            )
    bm = delta_block_m(bd)
    out.insert(
        1,
        Launch(
            "neighborhood",
            "na2d_bwd_delta",
            math.ceil(BH * n / bm),
            4,
            1,
            dict(BLOCK_M=bm, BLOCK_D=bd),
            0.0,
            2.0 * n * D * BH,
            BH * (2 * mapbytes + n * 4),
            BH * (2 * mapbytes + n * 4),
        ),
    )
    return out


def _tt(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]


def find_spec(launch: Launch, dtype, specs) -> Optional[object]:
    """The AOT spec the kernel module declares for this launch: same kernel name, constexprs,
    warps, stages and element type of its first pointer argument."""
    tt = _tt(dtype)
    for spec in specs:
        if spec.name != launch.kernel or spec.num_warps != launch.num_warps or spec.num_stages != launch.num_stages:
            continue
        if any(spec.constexprs.get(k, v) != v for k, v in launch.constexprs.items()):
            continue
        first_ptr = next((t for t in spec.signature.values() if t.startswith("*")), "")
        if first_ptr == f"*{tt}":
            return spec
    return None


def attach_ptxas(launches: List[Launch], dtype, cc: int = 90) -> List[str]:
    """Compile each launch's configuration for ``cc`` and record registers, shared memory, spills;
    returns messages for launches whose configuration no AOT spec declares."""
    from dcal.testing.aot import all_specs, compile_spec

    specs = all_specs()
    missing = []
    for launch in launches:
        spec = find_spec(launch, dtype, specs)
        if spec is None:
            missing.append(f"{launch.kernel} {launch.constexprs} warps={launch.num_warps}: no AOT spec declares it")
            continue
        row = compile_spec(spec, cc)
        launch.regs, launch.smem, launch.spills = row["regs"], row["shared"], row["spill_bytes"]
    return missing


def table(launches: List[Launch], gpu=H100) -> List[str]:
    ridge = gpu["tflops"] * 1e12 / (gpu["tbps"] * 1e12)
    hdr = (
        f"{'kernel':<20}{'grid':>7}{'warps':>6}{'regs':>5}{'smem KiB':>9}{'CTA/SM':>7}{'limit':>8}{'occ':>5}"
        f"{'waves':>6}{'useful GF':>10}{'exec GF':>9}{'MB min':>8}{'MB tiled':>9}{'AI min':>7}{'AI tiled':>9}"
        f"{'t_flop us':>10}{'t_mem us':>9}"
    )
    lines = [hdr, "-" * len(hdr)]
    for l in launches:
        if l.regs is not None:
            occ = occupancy(l.regs, l.smem, l.num_warps, gpu)
            waves = l.grid / (gpu["sms"] * max(occ["ctas_per_sm"], 1))
            occ_txt = (
                f"{l.regs:>5}{l.smem / 1024:>9.1f}{occ['ctas_per_sm']:>7}{occ['limit']:>8}"
                f"{occ['occupancy']:>5.2f}{waves:>6.1f}"
            )
        else:
            occ_txt = f"{'?':>5}{'?':>9}{'?':>7}{'?':>8}{'?':>5}{'?':>6}"
        t_flop = l.exec_flops / (gpu["tflops"] * 1e12) * 1e6
        t_mem_lo, t_mem_hi = l.bytes_min / (gpu["tbps"] * 1e12) * 1e6, l.bytes_tiled / (gpu["tbps"] * 1e12) * 1e6
        lines.append(
            f"{l.kernel:<20}{l.grid:>7}{l.num_warps:>6}{occ_txt}{l.useful_flops / 1e9:>10.1f}"
            f"{l.exec_flops / 1e9:>9.1f}{l.bytes_min / 1e6:>8.1f}{l.bytes_tiled / 1e6:>9.1f}"
            f"{l.useful_flops / l.bytes_min:>7.0f}{l.useful_flops / l.bytes_tiled:>9.0f}"
            f"{t_flop:>10.1f}{t_mem_lo:>4.0f}-{t_mem_hi:<4.0f}"
        )
    tot_u = sum(l.useful_flops for l in launches)
    tot_e = sum(l.exec_flops for l in launches)
    t_lo = t_hi = 0.0  # each launch bound by the slower of its compute and its memory time
    for l in launches:
        t_f = l.exec_flops / (gpu["tflops"] * 1e12)
        t_lo += max(t_f, l.bytes_min / (gpu["tbps"] * 1e12))
        t_hi += max(t_f, l.bytes_tiled / (gpu["tbps"] * 1e12))
    best = tot_u / t_lo / 1e12
    lines.append(
        f"total: useful {tot_u / 1e9:.1f} GFLOP, executed {tot_e / 1e9:.1f} GFLOP ({tot_e / tot_u:.2f}x); "
        f"launches bound {t_lo * 1e6:.0f}-{t_hi * 1e6:.0f} us -> at most {best:.0f} useful TFLOP/s "
        f"({best / gpu['tflops']:.0%} of peak) if every launch ran at the peak rate of its bound; "
        f"ridge {ridge:.0f} FLOP/B"
    )
    return lines


def report(dtypes=("float16", "bfloat16"), compile_kernels: bool = True, gpu=H100) -> str:
    import torch

    out = [
        f"Roofline on paper: {gpu['name']} ({gpu['tflops']:.0f} TFLOP/s dense fp16/bf16, {gpu['tbps']} TB/s HBM, "
        f"{gpu['smem_sm'] // 1024} KiB smem and {gpu['regs_sm'] // 1024}K registers per SM, {gpu['sms']} SMs); "
        f"registers and shared memory from ptxas for sm_{gpu['cc']}.",
        "AI: useful FLOP per byte (min: each tensor moved once; tiled: every program reads its tiles, no L2 "
        "reuse). t_flop: executed FLOPs at peak; t_mem: bytes min-tiled at full bandwidth.",
    ]
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for title, launches in (
            (
                f"PWCA, DCAL size (B {DCAL['B']}, {DCAL['NQ']} x ({DCAL['NK1']} + {DCAL['NK2']}), "
                f"{DCAL['H']} heads, D {DCAL['D']}), {dtype_name}",
                pwca_launches(dtype),
            ),
            (
                f"Neighborhood attention, BEV size (B {BEV['B']}, {BEV['X']}x{BEV['Y']}, "
                f"{BEV['H'] * BEV['D']} ch, {BEV['H']} heads, k {BEV['KS']}, rpb), {dtype_name}",
                na2d_launches(dtype),
            ),
        ):
            out += ["", title]
            if compile_kernels:
                for msg in attach_ptxas(launches, dtype, gpu["cc"]):
                    out.append(f"  (occupancy unknown: {msg})")
            out += table(launches, gpu)
    text = "\n".join(out)
    return text
