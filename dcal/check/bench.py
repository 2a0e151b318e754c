"""Benchmarks of ``python -m dcal.check``: every provider of a comparison side by side in one process.

``python -m dcal.check.bench --group pwca|neighborhood|rollout|train|peak --device cpu|cuda
--out rows.jsonl [--quick]`` (one group per process, so a fault loses one group only).

Each provider is built (inputs in its own native layout, compiled if it is a compiled provider)
and warmed up first; then ``rounds`` rounds run every provider once each, in an order rotated
every round, and the median is reported. On CUDA a call is timed with CUDA events on the current
stream (recorded around the call, then ``end.synchronize()``); its peak memory is measured in a
separate call after ``synchronize`` + ``empty_cache`` + ``reset_peak_memory_stats``, as
``max_memory_allocated`` minus what was allocated before the call. On CPU time is
``perf_counter`` and peak memory is not measured here (``bench/`` does it per subprocess).

TFLOP/s are computed from the FLOP formulas of :mod:`dcal.testing.flops` (attention:
4*B*H*Nq*Nk*D forward, x3.5 with backward), and their share of the device's matmul peak,
measured by the ``peak`` group in the same run (a large matmul in the same dtype). Timing,
peak memory, ``Unavailable`` and the peer implementations are the harness's (:mod:`dcal.testing`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dcal.testing.flops import (
    flops_attention,
    flops_matmul,
    flops_neighborhood,
    flops_rollout,
    flops_vit_step,
)
from dcal.testing.measure import Unavailable, cuda_peak, sync, time_events_ms
from dcal.testing.providers import naive_pwca, sdpa_cat_pwca, step, unfold_na


def peak_mib(fn: Callable, device: str) -> Optional[float]:
    """Peak memory of one call in MiB beyond what is allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    return cuda_peak(fn)[0] / 2**20


def compare(
    case: str,
    flops: float,
    dtype: str,
    providers: Dict[str, Callable[[], Callable]],
    device: str,
    rounds: int,
    warmup: int,
) -> List[dict]:
    """Build, warm up, measure memory, then time ``rounds`` interleaved rounds of every provider."""
    rows, fns = {}, {}
    for name, make in providers.items():
        r = dict(
            case=case,
            provider=name,
            dtype=dtype,
            ms=None,
            peak_mib=None,
            tflops=None,
            share=None,
            status="ok",
            detail="",
            flops=flops,
            device=device,
        )
        rows[name] = r
        try:
            fn = make()
            for _ in range(warmup):
                time_events_ms(fn, device)
            r["peak_mib"] = peak_mib(fn, device)
            fns[name] = fn
        except Unavailable as e:
            r.update(status="skip", detail=str(e))
        except torch.cuda.OutOfMemoryError as e:
            r.update(status="oom", detail=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001  (a provider's failure is its row's result)
            r.update(
                status="error",
                detail=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            )
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    times = {n: [] for n in fns}
    order = list(fns)
    for i in range(rounds):
        k = i % max(1, len(order))
        for name in order[k:] + order[:k]:
            if rows[name]["status"] != "ok":
                continue
            try:
                times[name].append(time_events_ms(fns[name], device))
            except torch.cuda.OutOfMemoryError as e:
                rows[name].update(status="oom", detail=str(e).splitlines()[0][:200])
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                rows[name].update(status="error", detail=f"{type(e).__name__}: {e}"[:300])
    for name, ts in times.items():
        if ts and rows[name]["status"] == "ok":
            ms = statistics.median(ts)
            rows[name].update(
                ms=round(ms, 4),
                tflops=float(f"{flops / (ms * 1e-3) / 1e12:.4g}") if flops else None,
                spread=[round(min(ts), 4), round(max(ts), 4)],
                rounds=len(ts),
            )
    fns.clear()
    return list(rows.values())


def _rand(shape, dtype, device, seed, grad=False):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------- PWCA


def sdpa_kernel_used(q, k, v) -> str:
    """Which SDPA implementation PyTorch runs for these inputs: the profiler's op/kernel names
    (``_scaled_dot_product_flash_attention``, ``_efficient_attention``, ``cudnn``, ``math``),
    plus the backends that can run them when forced one at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        F.scaled_dot_product_attention(q, k, v)
        sync(q.device.type)
    names = {e.name for e in prof.events()}
    picked = sorted(
        n
        for n in names
        if n.startswith("aten::_scaled_dot_product")
        or n.startswith("aten::_efficient")
        or n.startswith("aten::_flash")
        or "cudnn" in n.lower()
        and "attention" in n.lower()
    )
    can = []
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with torch.no_grad(), sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, v)
            can.append(b.name.lower())
        except RuntimeError:
            pass
    return f"PyTorch ran {', '.join(picked) or 'unknown'}; runnable: {', '.join(can)}"


def bench_pwca(device, quick, rounds, warmup, dtype):
    import dcal.ops
    from torch.nn.attention.flex_attention import flex_attention

    if device == "cuda":
        B, H, N, D = 8, 12, 785, 64
        modes = ("fwd+bwd",) if quick else ("fwd", "fwd+bwd")
    else:
        (B, H, N, D), modes = ((1, 2, 65, 32) if quick else (2, 12, 785, 64)), ("fwd+bwd",)
    rows = []
    flex = torch.compile(flex_attention, dynamic=False)
    for mode in modes:
        case = f"pwca B{B} H{H} {N}x({N}+{N}) D{D} {dtype} {mode}"
        flops = flops_attention(B, H, N, 2 * N, D, mode)
        tdt = getattr(torch, dtype)
        grad = mode != "fwd"

        def inputs():
            ts = [_rand((B, H, N, D), tdt, device, s, grad) for s in range(5)]
            return ts, (_rand((B, H, N, D), tdt, device, 9) if grad else None)

        def make(fn):
            def m():
                ts, dout = inputs()
                return step(fn, ts, dout)

            return m

        def make_dcal():
            ts, dout = inputs()
            chosen = dcal.ops.chosen_backend("pwca_attention", ts[0])
            rows_detail["dcal"] = f"backend {chosen}"
            return step(lambda *a: dcal.ops.pwca_attention(*a), ts, dout)

        rows_detail = {}
        ts0, _ = inputs()
        kcat, vcat = torch.cat([ts0[1], ts0[3]], -2).detach(), torch.cat([ts0[2], ts0[4]], -2).detach()
        try:
            rows_detail["sdpa_cat"] = sdpa_kernel_used(ts0[0].detach(), kcat, vcat)
        except Exception as e:  # noqa: BLE001
            rows_detail["sdpa_cat"] = f"kernel probe failed: {type(e).__name__}: {e}"[:200]
        del ts0, kcat, vcat

        def flex_p():
            if grad and device != "cuda":
                raise Unavailable("FlexAttention has no CPU backward")
            return make(
                lambda q, k1, v1, k2, v2: flex(q, torch.cat([k1, k2], -2), torch.cat([v1, v2], -2), scale=D**-0.5)
            )()

        provs = {
            "dcal": make_dcal,
            "sdpa_cat": make(lambda *a: sdpa_cat_pwca(*a, scale=D**-0.5)),
            "flex_cat": flex_p,
            "naive": make(lambda *a: naive_pwca(*a, scale=D**-0.5)),
        }
        res = compare(case, flops, dtype, provs, device, rounds, warmup)
        for r in res:
            r["detail"] = "; ".join(x for x in (rows_detail.get(r["provider"], ""), r["detail"]) if x)
        rows += res
    return rows


# ----------------------------------------------------------------------------- neighborhood


def bench_neighborhood(device, quick, rounds, warmup, dtype):
    import dcal.ops

    ks = 7
    if device == "cuda":
        B, H, X, D = 2, 4, 256, 64
        modes = ("fwd+bwd",) if quick else ("fwd", "fwd+bwd")
    else:
        (B, H, X, D), modes = (
            ((1, 2, 24, 16) if quick else (1, 4, 64, 32)),
            (("fwd+bwd",) if quick else ("fwd", "fwd+bwd")),
        )
    Y, C, r = X, H * D, ks // 2
    tdt = getattr(torch, dtype)
    rows = []
    for mode in modes:
        grad = mode != "fwd"
        case = f"neighborhood B{B} C{C} (H{H} D{D}) {X}x{Y} k{ks} {dtype} {mode}"
        flops = flops_neighborhood(B, H, X, Y, ks, D, mode)

        def dcal_p():
            ts = [_rand((B, H, X, Y, D), tdt, device, s, grad) for s in range(3)]
            dout = _rand((B, H, X, Y, D), tdt, device, 9) if grad else None
            return step(
                lambda q, k, v: dcal.ops.neighborhood_attention2d(q, k, v, kernel_size=ks, border="zero"), ts, dout
            )

        def unfold_p():
            ts = [_rand((B, C, X, Y), tdt, device, s, grad) for s in range(3)]
            dout = _rand((B, C, X, Y), tdt, device, 9) if grad else None
            return step(lambda q, k, v: unfold_na(q, k, v, H, ks), ts, dout)

        def flex_p():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            if grad and device != "cuda":
                raise Unavailable("FlexAttention has no CPU backward")

            def window(b, h, qi, ki):  # border "mask": the centred window, off-map keys left out
                return ((qi // Y - ki // Y).abs() <= r) & ((qi % Y - ki % Y).abs() <= r)

            # _compile: evaluate the mask block by block instead of materialising [X*Y, X*Y]
            mask = create_block_mask(
                window, B=None, H=None, Q_LEN=X * Y, KV_LEN=X * Y, device=device, _compile=device == "cuda"
            )
            flex = torch.compile(flex_attention, dynamic=False)
            ts = [_rand((B, H, X * Y, D), tdt, device, s, grad) for s in range(3)]
            dout = _rand((B, H, X * Y, D), tdt, device, 9) if grad else None
            return step(lambda q, k, v: flex(q, k, v, block_mask=mask), ts, dout)

        def natten_p():
            try:
                import natten
            except ImportError:
                raise Unavailable("natten is not installed")
            if grad and device != "cuda":
                raise Unavailable("NATTEN has no CPU backward")
            ts = [_rand((B, X, Y, H, D), tdt, device, s, grad) for s in range(3)]
            dout = _rand((B, X, Y, H, D), tdt, device, 9) if grad else None
            return step(lambda q, k, v: natten.na2d(q, k, v, kernel_size=ks), ts, dout)

        provs = {
            "dcal (zero)": dcal_p,
            "unfold (zero)": unfold_p,
            "flex block mask (mask)": flex_p,
            "natten (clamp)": natten_p,
        }
        rows += compare(case, flops, dtype, provs, device, rounds, warmup)
        ch = dcal.ops.chosen_backend("neighborhood_attention2d", torch.empty(1, 1, 1, 1, D, device=device, dtype=tdt))
        for row in rows[-len(provs) :]:
            if row["provider"].startswith("dcal"):
                row["detail"] = f"backend {ch}; " + row["detail"]
    return rows


# ----------------------------------------------------------------------------- rollout


def bench_rollout(device, quick, rounds, warmup, dtype):
    import dcal.ops
    from dcal.ops import reference

    if device == "cuda":
        B, H, N, D, L = 8, 12, 785, 64, 12
    else:
        B, H, N, D, L = (1, 2, 65, 32, 3) if quick else (2, 12, 785, 64, 12)
    tdt = getattr(torch, dtype)
    qs = [_rand((B, H, N, D), tdt, device, 2 * i) for i in range(L)]
    ks = [_rand((B, H, N, D), tdt, device, 2 * i + 1) for i in range(L)]
    lses = [torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * D**-0.5, -1) for q, k in zip(qs, ks)]
    case = f"rollout B{B} H{H} N{N} D{D} L{L} {dtype}"
    flops = flops_rollout(B, H, N, D, L)
    ch = dcal.ops.chosen_backend("attention_rollout", qs[0])
    provs = {
        "dcal (lses given)": lambda: lambda: dcal.ops.attention_rollout(qs, ks, lses=lses),
        "dcal (recomputed)": lambda: lambda: dcal.ops.attention_rollout(qs, ks),
        "dense reference": lambda: lambda: reference.attention_rollout(qs, ks),
    }
    rows = compare(case, flops, dtype, provs, device, rounds, warmup)
    for r in rows:
        if r["provider"].startswith("dcal"):
            r["detail"] = f"backend {ch}; " + r["detail"]
    return rows


# ----------------------------------------------------------------------------- training step


VIT_B = dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12)
TINY_VIT = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def bench_train(device, quick, rounds, warmup, dtype):
    from dcal.models import DCALConfig, DCALViT

    if device == "cuda":
        p, batches, dtypes = VIT_B, ((8,) if quick else (8, 16)), (("bfloat16",) if quick else ("bfloat16", "float16"))
    else:
        p, batches, dtypes = TINY_VIT, (2,), ("bfloat16",)
    rows = []
    for dt in dtypes:
        for B in batches:
            adt = getattr(torch, dt)
            case = f"DCAL train step {p['img_size']}px d{p['depth']} w{p['embed_dim']} B{B} {dt} autocast"
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(B, 3, p["img_size"], p["img_size"], generator=g).to(device)
            y = torch.randint(0, 200, (B,), generator=g).to(device)

            def make(backend):
                def m():
                    torch.manual_seed(0)
                    cfg = DCALConfig(**p, num_classes=200, ablation="full", backend=backend)
                    model = DCALViT(cfg).to(device).train()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
                    scaler = torch.amp.GradScaler(device, enabled=(dt == "float16"))

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast(device, dtype=adt):
                            loss, _ = model.loss(model(x), y)
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                        return loss.detach()

                    return step

                return m

            rows += compare(
                case,
                flops_vit_step(B, p),
                dt,
                {"fused (default chain)": make(None), "materialising (reference)": make("reference")},
                device,
                rounds,
                warmup,
            )
    return rows


# ----------------------------------------------------------------------------- matmul peak


def bench_peak(device, quick, rounds, warmup, dtypes):
    rows = []
    n = 8192 if device == "cuda" else (768 if quick else 2048)
    for dt in dtypes:
        tdt = getattr(torch, dt)
        a, b = _rand((n, n), tdt, device, 0), _rand((n, n), tdt, device, 1)
        rows += compare(
            f"matmul {n}^3 {dt}",
            flops_matmul(n, n, n),
            dt,
            {"torch.matmul": lambda: lambda: a @ b},
            device,
            max(rounds, 5),
            warmup,
        )
    return rows


GROUPS = {
    "peak": bench_peak,
    "pwca": bench_pwca,
    "neighborhood": bench_neighborhood,
    "rollout": bench_rollout,
    "train": bench_train,
}


def bench_dtypes(device: str) -> Tuple[str, ...]:
    return ("float16",) if device == "cuda" else ("float32",)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.check.bench")
    p.add_argument("--group", required=True, nargs="+", choices=tuple(GROUPS))
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args(argv)
    rounds = a.rounds or (10 if a.device == "cuda" else 3) * (1 if a.quick else 2)
    warmup = 2 if a.device == "cuda" else 1
    with open(a.out, "a", buffering=1) as f:
        for group in a.group:
            f.write(json.dumps({"group_start": group}) + "\n")
            f.flush()
            try:
                if group == "peak":
                    dts = ("float16", "bfloat16", "float32") if a.device == "cuda" else ("float32", "bfloat16")
                    rows = bench_peak(a.device, a.quick, rounds, warmup, dts)
                else:
                    rows = []
                    for dt in bench_dtypes(a.device):
                        rows += GROUPS[group](a.device, a.quick, rounds, warmup, dt)
            except Exception as e:  # noqa: BLE001  (the group's set-up failed: one error row)
                tb = traceback.extract_tb(e.__traceback__)
                where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
                rows = [
                    dict(
                        case=group,
                        provider="(set-up)",
                        ms=None,
                        peak_mib=None,
                        tflops=None,
                        share=None,
                        status="error",
                        detail=f"{type(e).__name__}: {e}"[:300] + where,
                        flops=None,
                        device=a.device,
                        dtype=None,
                    )
                ]
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps({"group_done": group}) + "\n")
            f.flush()
            if a.device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
