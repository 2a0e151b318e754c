"""timm ViT training step before and after ``dcal.nn.fuse_attention`` (the one-line conversion).

``python -m bench.timm_step [--model vit_base_patch16_224] [--img-size 448] [--batch 1] [--reps 1]
[--device cpu|cuda] [--dtype float32] [--csv out.csv]``

One step = forward, cross-entropy, backward and an AdamW step of ``timm.create_model(model,
pretrained=False, img_size=img_size)`` (random weights, nothing downloaded), as timm builds it
(``"timm"``: timm's attention, PyTorch SDPA) and after ``fuse_attention(model)`` (``"dcal"``:
dcal's fused attention; same weights, same seed, same input). The defaults are sized for a CPU:
batch 1 and one measured step per provider (``--reps 1``; a ViT-B/16 step at 448 px, 785 tokens,
takes seconds to a minute on a loaded 2-core CPU). Raise ``--reps`` for a spread.

Each measured step runs in a fresh subprocess (model, optimiser, one warm-up step, then the
measured step), providers interleaved round by round (timm, dcal, dcal, timm, ...) so the load of
a shared machine hits both alike. Peak memory is what the step adds to the weights and optimiser
state (gradients are freed between steps): activations, gradients and temporaries. On CUDA
``max_memory_allocated`` minus what was allocated before the step; on CPU the peak resident set
(VmHWM, reset before the step) minus the resident set before it, with glibc's allocator made to
return freed blocks to the system.
Throughput: matmul FLOPs of the step (forward 2*N*C*C*12 + 4*N*N*C per block, plus the patch
embedding; backward counted as 2x forward), shown as a share of an sgemm (fp32 2048^3, on the
same device, measured in the same run).

Self-contained: it needs timm (and dcal), not the rest of ``bench``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

PROVIDERS = ("timm", "dcal")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _flops(model, batch: int, img: int) -> float:
    C, L = model.embed_dim, len(model.blocks)
    p = model.patch_embed.patch_size[0]
    P = (img // p) ** 2
    N = P + model.num_prefix_tokens
    block = 2 * N * C * C * 12 + 4 * N * N * C  # qkv 3, proj 1, MLP 8 (x C*C); QK^T and PV
    return 3.0 * batch * (L * block + 2 * P * C * 3 * p * p)


def _child(args) -> dict:
    libc = _libc()
    if libc is not None and args.device == "cpu":
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks go back to the system when freed
    import timm
    import torch

    import dcal.nn
    from dcal.testing.measure import cpu_peak, cuda_peak

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=args.classes)
    model = model.to(dev, dtype).train()
    if args.provider == "dcal":
        model = dcal.nn.fuse_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(dev, dtype)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # between steps only weights and optimiser state stay
        return loss

    step()  # warm-up: optimiser state exists, kernels are loaded
    out = {}

    def timed():
        out["loss"] = step()

    # peak beyond what is live before the step (max_memory_allocated; on CPU the resident set)
    peak, ms = (cuda_peak if dev.type == "cuda" else cpu_peak)(timed)
    return {
        "seconds": ms / 1e3,
        "peak": peak,
        "loss": float(out["loss"]),
        "flops": _flops(model, args.batch, args.img_size),
    }


def _sgemm(device: str) -> float:
    import torch

    a, b = (torch.randn(2048, 2048, device=device) for _ in range(2))
    times = []
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    from dcal.testing.flops import flops_matmul

    return flops_matmul(2048, 2048, 2048) / statistics.median(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.timm_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1, help="measured steps per provider, interleaved")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.provider:
        print(json.dumps(_child(args)))
        return {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    runs = {p: [] for p in PROVIDERS}
    for r in range(args.reps):
        for p in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:
            cmd = [sys.executable, "-m", "bench.timm_step", "--provider", p] + [
                a
                for k, v in vars(args).items()
                if k not in ("provider", "reps", "csv")
                for a in (f"--{k.replace('_', '-')}", str(v))
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{p} step failed:\n{out.stderr[-2000:]}")
            runs[p].append(json.loads(out.stdout.strip().splitlines()[-1]))
    sgemm = _sgemm(args.device)
    print(
        f"{args.model} img {args.img_size} batch {args.batch} {args.dtype} on {args.device}, "
        f"{args.reps} interleaved step(s) per provider; sgemm {sgemm / 1e9:.1f} GFLOP/s"
    )
    print(f"{'provider':<8} {'median s':>9} {'min s':>8} {'GFLOP/s':>8} {'of sgemm':>8} {'peak MiB':>9} {'loss':>8}")
    rows = {}
    for p in PROVIDERS:
        t = [x["seconds"] for x in runs[p]]
        med, peak = statistics.median(t), statistics.median(x["peak"] for x in runs[p])
        rate = runs[p][0]["flops"] / med
        rows[p] = dict(
            median_s=med,
            min_s=min(t),
            gflops=rate / 1e9,
            of_sgemm=rate / sgemm,
            peak_mib=peak / 2**20,
            loss=runs[p][0]["loss"],
        )
        print(
            f"{p:<8} {med:>9.2f} {min(t):>8.2f} {rate / 1e9:>8.1f} {rate / sgemm:>8.1%} {peak / 2**20:>9.1f} "
            f"{rows[p]['loss']:>8.4f}"
        )
    print(
        f"dcal / timm: time {rows['dcal']['median_s'] / rows['timm']['median_s']:.2f}x, "
        f"peak memory {rows['dcal']['peak_mib'] / max(rows['timm']['peak_mib'], 1e-9):.2f}x"
    )
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("provider,model,img_size,batch,dtype,device,median_s,min_s,gflops,of_sgemm,peak_mib,loss\n")
            for p, r in rows.items():
                f.write(
                    f"{p},{args.model},{args.img_size},{args.batch},{args.dtype},{args.device},{r['median_s']:.4f},"
                    f"{r['min_s']:.4f},{r['gflops']:.2f},{r['of_sgemm']:.4f},{r['peak_mib']:.1f},{r['loss']:.6f}\n"
                )
    return rows


if __name__ == "__main__":
    main()
