"""Accumulation of batch-coupled losses: the whole batch vs the naive split vs the embedding cache.

``python -m bench.accumulation [--quick] [--cases contrastive episodic] [--no-memory] [--csv PATH]``

Two cases, each a loss that couples the samples of its batch:

* ``contrastive``: CLIP's symmetric InfoNCE with a learnable temperature on :class:`dcal.models.CLIP`
  (image ViT on the fused attention, causal text transformer); a batch of pairs, micro-batches of
  a quarter of it.
* ``episodic``: a prototypical network (:class:`dcal.models.ProtoNet`, Conv-4 with GroupNorm) with
  the VIC regulariser on 5-way 5-shot 15-query episodes; micro-batches of 25 images.

Providers:

* ``full``: the whole batch in one forward and backward (the definition; peak memory of all
  activations at once).
* ``naive``: what the usual training code does to fit memory: each micro-batch its own loss, averaged (the
  contrastive negatives shrink to the micro-batch; an episode becomes micro-episodes with their
  own prototypes from a share of the shots). Not the same objective.
* ``exact``: :func:`dcal.train.coupled.cached_backward` (no-graph pass for the embeddings, the whole
  batch's loss and its gradient with respect to them, re-run of each micro-batch with a graph).
* ``one_micro``: forward and backward of a single micro-batch (the memory an exact accumulation
  should be near).

Columns: the difference of the loss and of every parameter gradient from ``full`` in fp64 (the
largest absolute difference over all parameters, and the same relative to the largest gradient
entry), and the peak memory of one step in fp32 at the bench's sizes: on CPU the peak resident
set of a fresh subprocess per provider above its baseline after a warm-up step (``max_memory_allocated``
on CUDA is not used here: the bench runs on CPU). Expected: ``exact`` within 1e-10 of ``full``,
``naive`` visibly off, ``exact``'s peak near ``one_micro``'s and below ``full``'s.

Self-contained on purpose (plain subprocess and table code): it depends on dcal only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import torch

CASES = ("contrastive", "episodic")
PROVIDERS = ("full", "naive", "exact", "one_micro")


# ----------------------------------------------------------------------------- problems


def problem(case: str, dtype: torch.dtype, size: str):
    """(model, loss, inputs, target, micro_batch, naive_fn) of a case; ``size``: "check" (small,
    for the fp64 differences), "quick" or "full" (memory)."""
    from dcal.models import CLIP, CLIPConfig, ProtoNet
    from dcal.train.coupled import ClipLoss, PrototypicalLoss

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if case == "contrastive":
        batch = {"check": 16, "quick": 64, "full": 256}[size]
        img_size = {"check": 16, "quick": 32, "full": 32}[size]
        width = {"check": 32, "quick": 64, "full": 128}[size]
        depth = 1 if size == "check" else 2
        c = CLIPConfig(
            embed_dim=32,
            img_size=img_size,
            patch_size=4,
            vision_width=width,
            vision_depth=depth,
            vision_heads=width // 32,
            vocab_size=32,
            context_length=12,
            text_width=width,
            text_depth=depth,
            text_heads=width // 32,
        )
        model = CLIP(c).to(dtype)
        img = torch.randn(batch, 3, img_size, img_size, generator=g).to(dtype)
        tok = torch.randint(1, 31, (batch, 12), generator=g)
        tok[torch.arange(batch), torch.randint(3, 12, (batch,), generator=g)] = 31
        return model, ClipLoss(), (img, tok), torch.arange(batch), batch // 4, naive_contrastive
    if case == "episodic":
        img_size = {"check": 16, "quick": 20, "full": 40}[size]
        model = ProtoNet(in_chans=3, hidden={"check": 8, "quick": 64, "full": 64}[size], depth=4).to(dtype)
        loss = PrototypicalLoss(5, 5, 15, vic_weight=0.1)
        y = torch.cat([torch.arange(5).repeat_interleave(5), torch.arange(5).repeat_interleave(15)])
        means = torch.randn(5, 3, 1, 1, generator=g)
        x = (means[y] + 0.5 * torch.randn(len(y), 3, img_size, img_size, generator=g)).to(dtype)
        return model, loss, x[None], y[None], 25, naive_episodic
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def naive_contrastive(model, loss, inputs, target, micro: int) -> float:
    from dcal.train.coupled import clip_loss

    (img, tok), n, total = inputs, inputs[0].shape[0], 0.0
    for s in range(0, n, micro):
        e = min(s + micro, n)
        value = clip_loss(*model(img[s:e], tok[s:e])) * ((e - s) / n)
        value.backward()
        total += float(value.detach())
    return total


def naive_episodic(model, loss, x, y, micro: int) -> float:
    """The episode cut into micro-episodes of at most ``micro`` images, each with the same share of
    every class's shots and queries (the fewest parts that divide both), each its own prototypes."""
    from dcal.train.coupled import PrototypicalLoss

    N, K, Q = loss.n_way, loss.k_shot, loss.q_query
    parts = next((d for d in range(1, K + 1) if K % d == 0 and Q % d == 0 and N * (K + Q) // d <= micro), None)
    if parts is None:
        raise ValueError(
            f"naive split: no micro-episode of at most {micro} images has an equal share of k_shot {K} and q_query {Q}"
        )
    sub = PrototypicalLoss(N, K // parts, Q // parts, loss.vic_weight, loss.variance, loss.invariance, loss.covariance)
    total = 0.0
    for e in range(x.shape[0]):
        sup = x[e, : N * K].view(N, K, *x.shape[2:])
        qry = x[e, N * K :].view(N, Q, *x.shape[2:])
        ys = torch.cat([torch.arange(N).repeat_interleave(K // parts), torch.arange(N).repeat_interleave(Q // parts)])
        for p in range(parts):
            xs = torch.cat(
                [
                    sup[:, p * K // parts : (p + 1) * K // parts].flatten(0, 1),
                    qry[:, p * Q // parts : (p + 1) * Q // parts].flatten(0, 1),
                ]
            )
            value = sub.episode_loss(model(xs), ys) / (parts * x.shape[0])
            value.backward()
            total += float(value.detach())
    return total


def run(provider: str, model, loss, inputs, target, micro: int, naive_fn) -> float:
    """One step's forward and backward into ``.grad``; returns the loss."""
    from dcal.train.coupled import cached_backward

    model.zero_grad(set_to_none=True)
    if provider == "full":
        value = loss.batch_loss(loss.forward_model(model, loss.rows(inputs)), target)
        value.backward()
        return float(value.detach())
    if provider == "naive":
        return naive_fn(model, loss, inputs, target, micro)
    if provider == "exact":
        return float(cached_backward(model, loss, inputs, target, micro))
    if provider == "one_micro":
        rows = loss.rows(inputs)
        part = tuple(t[:micro] for t in rows) if isinstance(rows, tuple) else rows[:micro]
        out = loss.forward_model(model, part)
        flat = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if t.ndim >= 1]
        value = sum(t.float().square().mean() for t in flat)
        value.backward()
        return float(value.detach())
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ----------------------------------------------------------------------------- measurements


def differences(case: str) -> Dict[str, Dict[str, float]]:
    """fp64: |loss - full|, max |grad - full| and that relative to max |full grad|, per provider."""
    model, loss, inputs, target, micro, naive_fn = problem(case, torch.float64, "check")
    out, ref_loss, ref = {}, None, None
    for provider in ("full", "naive", "exact"):
        value = run(provider, model, loss, inputs, target, micro, naive_fn)
        g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if provider == "full":
            ref_loss, ref = value, g
        scale = max(float(t.abs().max()) for t in ref.values())
        diff = max(float((g[n] - ref[n]).abs().max()) for n in ref)
        out[provider] = {"loss_diff": abs(value - ref_loss), "grad_diff": diff, "grad_rel": diff / scale}
    return out


def _child(case: str, provider: str, size: str) -> Dict[str, Any]:
    """In a fresh process: peak RSS of one step above the baseline after a warm-up step."""
    import gc

    from dcal.train.memory import cpu_peak_rss, cpu_rss, release_free_heap, reset_cpu_peak

    torch.set_num_threads(1)
    model, loss, inputs, target, micro, naive_fn = problem(case, torch.float32, size)
    run(provider, model, loss, inputs, target, micro, naive_fn)  # warm-up: grads, thread pools, code
    gc.collect()
    release_free_heap()
    base = cpu_rss()
    if not reset_cpu_peak():
        return {"error": "cannot reset the peak resident set (/proc/self/clear_refs)"}
    t0 = time.perf_counter()
    run(provider, model, loss, inputs, target, micro, naive_fn)
    seconds = time.perf_counter() - t0
    return {
        "peak_mb": (cpu_peak_rss() - base) / 2**20,
        "seconds": seconds,
        "micro_batch": micro,
        "rows": int((loss.rows(inputs)[0] if isinstance(inputs, tuple) else loss.rows(inputs)).shape[0]),
    }


def measure(case: str, provider: str, size: str, timeout: float = 900) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "bench.accumulation", "--child", case, provider, size],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def table(rows: List[Dict[str, Any]]) -> str:
    head = ["case", "provider", "loss diff", "grad diff", "grad diff rel", "peak MiB", "peak / one_micro", "step s"]
    lines = [head]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            [
                r["case"],
                r["provider"],
                f(r.get("loss_diff"), ".2e"),
                f(r.get("grad_diff"), ".2e"),
                f(r.get("grad_rel"), ".2e"),
                f(r.get("peak_mb"), ".1f") if "error" not in r else r["error"],
                f(r.get("peak_ratio"), ".2f"),
                f(r.get("seconds"), ".3f"),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accumulation", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small memory shapes (seconds)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--no-memory", action="store_true", help="only the fp64 differences")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--child", nargs=3, metavar=("CASE", "PROVIDER", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    torch.set_num_threads(1)
    size = "quick" if args.quick else "full"
    rows = []
    for case in args.cases:
        diffs = differences(case)
        mem = {} if args.no_memory else {pr: measure(case, pr, size) for pr in PROVIDERS}
        for provider in PROVIDERS:
            row = {"case": case, "provider": provider, **diffs.get(provider, {}), **mem.get(provider, {})}
            one = mem.get("one_micro", {}).get("peak_mb")
            if row.get("peak_mb") is not None and one:
                row["peak_ratio"] = row["peak_mb"] / one
            rows.append(row)
    print(
        f"fp64 differences from the whole batch; peak memory: fp32, {size} shapes, CPU peak RSS of a fresh "
        f"process above its baseline (torch {torch.__version__}, {os.cpu_count()} cores)"
    )
    print(table(rows))
    if args.csv:
        import csv

        keys = [
            "case",
            "provider",
            "loss_diff",
            "grad_diff",
            "grad_rel",
            "peak_mb",
            "peak_ratio",
            "seconds",
            "micro_batch",
            "rows",
            "error",
        ]
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if r["provider"] == "exact" and r.get("grad_diff", 0) > 1e-10]
    naive_ok = [r for r in rows if r["provider"] == "naive" and r.get("grad_rel", 1) < 1e-6]
    if bad or naive_ok:
        print(
            "check failed: exact accumulation must be within 1e-10 of the whole batch and the naive split off",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
