"""One op family of the correctness grid, run in its own process (a CUDA fault kills the context).

``python -m dcal.check.worker --family attention --device cuda --out rows.jsonl [...]`` writes one
JSON line per event: ``plan`` (every run id, first), ``start`` before a run, one ``row`` per check
and ``end`` after it. The parent (:mod:`dcal.check.cli`) reads the file after the process exits:
a run that started and did not end crashed the process; the parent records it as an error and
starts a new worker on the runs that remain (``--skip``).

Each run: inputs made on the device in the case's dtype and layout by the harness's builders
(:meth:`dcal.testing.Case.inputs`); the kernel's forward and backward (the loss
``sum(out * dout) + sum(lse * dlse)``) with every fresh allocation NaN-filled
(:func:`dcal.testing.nan_poison`), so an unwritten output shows; the ``reference`` backend on
the same rounded inputs in fp64 (the truth) and in the case's dtype (PyTorch's own error),
sliced per batch (and head) so the truth of the models' sizes fits; one row per output and
gradient judged by the rule of :mod:`dcal.testing.judging`.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback
from typing import Dict, List, Optional

from dcal.check import grid as G
from dcal.testing.poison import nan_poison


# ----------------------------------------------------------------------------- output


class Writer:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **event):
        self.f.write(json.dumps(event) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def row(run, check, status, max_err=None, tol=None, seconds=None, detail=""):
    return dict(
        op=run["op"],
        backend=run["backend"],
        device=run["device"],
        dtype=run["dtype"],
        shape=run["shape"],
        check=check,
        status=status,
        max_err=max_err,
        tol=tol,
        seconds=seconds,
        detail=detail,
        id=run["id"],
    )


# ----------------------------------------------------------------------------- the plan


def plan(
    family: str, device: str, quick: bool, ops=None, only=None, backends=None, dtypes=None, tier=None
) -> List[dict]:
    """Every (case, backend, dtype) run of this family, plus one torch.compile run per backend."""
    from dcal.ops import _dispatch

    runs = []
    cases = [c for c in G.select(device, quick, ops, only, tier) if c.family == family]
    for c in cases:
        dop = G.DISPATCH_OP[c.op]
        for b in _dispatch.ORDER[dop]:
            if b not in G.BACKENDS_UNDER_TEST or (backends and b not in backends):
                continue
            for dt in G.case_dtypes(c, device, quick):
                if dtypes and dt not in dtypes:
                    continue
                rid = f"{c.op}|{b}|{dt}|{c.shape_str()}"
                runs.append(
                    dict(
                        id=rid,
                        kind="grid",
                        case=c,
                        op=c.op,
                        backend=b,
                        device=device,
                        dtype=dt,
                        shape=c.shape_str(),
                        why=_skip_reason(c, b, dt, device),
                    )
                )
    # torch.compile(fullgraph=True) of each op once per backend (pwca_attention is multi_kv_attention
    # with two segments): its first TINY case without extras, in the first dtype the backend runs.
    seen = set()
    cbackends = G.compile_backends(device, quick)
    for r in list(runs):
        c = r["case"]
        key = (G.DISPATCH_OP[c.op], r["backend"])
        if (
            key in seen
            or c.tier != G.TINY
            or r["why"]
            or "dilation" in c.kw
            or (cbackends is not None and r["backend"] not in cbackends)
        ):
            continue
        seen.add(key)
        runs.append(
            dict(r, id=r["id"] + "|compile", kind="compile", why=_compile_skip_reason(family, r["backend"], device))
        )
    return runs


TRITON_OPS = {
    "attention": "dcal::pwca_fwd_triton",
    "neighborhood": "dcal::na2d_fwd_triton",
    "rollout": "dcal::rollout_triton",
}


def _compile_skip_reason(family: str, backend: str, device: str) -> Optional[str]:
    """torch.compile traces a ``triton_op`` by running its body on fake tensors; on a GPU that
    body only records the launches, but the interpreter would run the kernel on them. Ops that
    register as a plain custom op under the interpreter (with an explicit fake) can be compiled."""
    if backend != "triton" or device != "cpu":
        return None
    try:
        from torch._library.triton import triton_ops_to_kernels
    except ImportError:
        return None
    from dcal.ops import _dispatch

    _dispatch.preload(lazy=True)  # the Triton ops are defined on first use
    name = TRITON_OPS[family]
    if name in triton_ops_to_kernels:
        return (
            f"{name} is a triton_op also under TRITON_INTERPRET=1: torch.compile runs its body on fake "
            "tensors, which the interpreter cannot launch; compiled on a GPU only"
        )
    return None


def _skip_reason(c: G.Case, backend: str, dtype: str, device: str) -> Optional[str]:
    import torch

    why = G.unsupported_kwargs(c)
    if why:
        return why
    probe = torch.empty(
        (1,) * (3 if c.family != "neighborhood" else 4) + (c.s["D"],), dtype=getattr(torch, dtype), device=device
    )
    why = _claim(c, backend, probe)
    if why:
        return why
    if device == "cpu" and backend == "triton":
        if dtype == "bfloat16":
            return G.INTERPRETER_BF16
        if c.tier > G.TINY:
            return "Triton on CPU runs in the interpreter: tiny shapes only"
    if device == "cuda":
        need = _reference_bytes(c) + _kernel_bytes(c, dtype)
        free, _ = torch.cuda.mem_get_info()
        if need > 0.85 * free:
            return f"needs ~{need / 2**30:.1f} GiB, device has {free / 2**30:.1f} GiB free"
    return None


def _claim(c: G.Case, backend: str, probe) -> Optional[str]:
    """Why ``backend`` does not claim this case (None: it does), asked of the op's own chain with
    the case's attributes (kernel size, border, dilation, segments), as a call would ask it."""
    import dcal.ops

    if c.family == "neighborhood":
        attrs = {k: v for k, v in c.kw.items() if k in ("kernel_size", "border", "dilation")}
    elif c.family == "attention":
        attrs = {"segments": len(c.s["Nk"])}
    else:
        attrs = {"blocks": c.s["L"]}
    text = dcal.ops.explain(c.op, probe, backend=backend, **attrs)
    line = next((l.strip() for l in text.splitlines()[1:] if l.strip().startswith(backend)), "")
    if line.endswith("chosen"):
        return None
    reason = line.split("skipped:", 1)[1].strip() if "skipped:" in line else line or text
    return f"backend={backend!r} cannot run {c.op} here: {reason}"


def _esize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def _kernel_bytes(c: G.Case, dtype: str) -> int:
    """Inputs, outputs and gradients of the kernel call (an upper estimate)."""
    s = c.s
    n = c.numel()
    if c.family == "attention":
        tensors = 2 + 2 * sum(s["Nk"]) / s["Nq"]  # q, out + k, v of every segment
    elif c.family == "neighborhood":
        tensors = 4
    else:
        tensors = 2 * s["L"]
    return int(n * tensors * _esize(dtype) * (2 if c.grads else 1))


def _reference_bytes(c: G.Case) -> int:
    """Peak of one slice of the fp64 truth (scores / windows, kept for backward)."""
    s = c.s
    if c.family == "attention":
        return int(6 * s["H"] * s["Nq"] * sum(s["Nk"]) * 8)
    if c.family == "neighborhood":
        ks = c.kw.get("kernel_size", 7)
        return int(5 * s["X"] * s["Y"] * ks * ks * s["D"] * 8)  # one head: k and v windows and their grads
    return int(4 * s["H"] * s["N"] * s["N"] * 8)


# ----------------------------------------------------------------------------- helpers


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _acc(t):
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dot(a, b):
    return (a.to(_acc(a)) * b.to(_acc(a))).sum()


class Meter:
    """Streaming max |kernel - truth|, max |low - truth| and max |truth| over slices."""

    def __init__(self):
        self.err = self.ref_err = self.tmax = 0.0
        self.nonfinite = False

    def add(self, got, truth, low):
        import torch

        got_d, t = got.double(), truth.double()
        if not torch.isfinite(got_d).all():
            self.nonfinite = True
        self.err = max(self.err, (got_d - t).abs().max().item() if t.numel() else 0.0)
        self.tmax = max(self.tmax, t.abs().max().item() if t.numel() else 0.0)
        if low is not None:
            self.ref_err = max(self.ref_err, (low.double() - t).abs().max().item() if t.numel() else 0.0)


def _judge(run, name, m: Meter, seconds, extra=""):
    dtype = run["dtype"]
    tol = G.tolerance(dtype, name, m.ref_err, m.tmax)
    if m.nonfinite:
        return row(run, name, "fail", m.err, tol, seconds, "non-finite values (an unwritten output?)" + extra)
    status = "pass" if m.err <= tol else "fail"
    detail = f"reference {dtype} error {m.ref_err:.3g}, max abs(truth) {m.tmax:.3g}" + extra
    return row(run, name, status, m.err, tol, seconds, detail)


def _chunks(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield i, min(n, i + max(1, size))


# ----------------------------------------------------------------------------- attention


def _attn_call(op, q, kv, scale, backend):
    import dcal.ops
    from dcal.ops import reference

    if backend == "reference":
        return reference.multi_kv_attention(q, kv, scale=scale, return_lse=True)
    if op == G.PW:
        (k1, v1), (k2, v2) = kv
        return dcal.ops.pwca_attention(q, k1, v1, k2, v2, scale=scale, return_lse=True, backend=backend)
    return dcal.ops.multi_kv_attention(q, kv, scale=scale, return_lse=True, backend=backend)


def _attn_run(op, q, kv, dout, dlse, scale, backend, grads, fn=None):
    """(outputs by name) of one forward (+ backward) call."""
    import torch

    leaves = [q] + [t for pair in kv for t in pair]
    if grads:
        leaves = [t.detach().requires_grad_() for t in leaves]
    xq, xkv = leaves[0], list(zip(leaves[1::2], leaves[2::2]))
    call = fn or (lambda a, b: _attn_call(op, a, b, scale, backend))
    with torch.set_grad_enabled(grads):
        out, lse = call(xq, xkv)
        res = {"out": out.detach(), "lse": lse.detach()}
        if grads:
            gs = torch.autograd.grad(_dot(out, dout) + _dot(lse, dlse), leaves)
            names = ["q"] + [f"{kind}{i + 1}" for i in range(len(kv)) for kind in ("k", "v")]
            res.update({"d" + n: g for n, g in zip(names, gs)})
    return res


def run_attention(run, fn=None) -> Dict[str, "object"]:
    import torch

    c, device = run["case"], run["device"]
    dtype = getattr(torch, run["dtype"])
    q, kv, dout, dlse, scale = c.inputs(dtype, device)
    with nan_poison(run["backend"]):
        mine = _attn_run(c.op, q, kv, dout, dlse, scale, run["backend"], c.grads, fn)
        _sync(device)
    return dict(inputs=(q, kv, dout, dlse, scale), mine=mine)


def judge_attention(run, inputs, mine, seconds):
    import torch

    c = run["case"]
    q, kv, dout, dlse, scale = inputs
    batches = list(c.sample) if c.sample else list(range(q.shape[0]))
    per = max(1, int(2**28 // max(1, c.s["H"] * c.s["Nq"] * sum(c.s["Nk"]))))  # ~2 GiB of fp64 scores a slice
    meters: Dict[str, Meter] = {}
    low_dtype = None if q.dtype == torch.float64 else q.dtype
    for lo, hi in _chunks(len(batches), per):
        idx = torch.tensor(batches[lo:hi], device=q.device)
        sl = lambda t: t.index_select(0, idx)
        args = (sl(q), [(sl(k), sl(v)) for k, v in kv], sl(dout), sl(dlse), scale)
        truth = _attn_run(c.op, *(_to(args, torch.float64)), "reference", c.grads)
        low = _attn_run(c.op, *args, "reference", c.grads) if low_dtype is not None else None
        for name, t in truth.items():
            meters.setdefault(name, Meter()).add(sl(mine[name]), t, None if low is None else low[name])
        del truth, low
    return [_judge(run, n, m, seconds) for n, m in meters.items()]


def _to(args, dtype):
    q, kv, dout, dlse, scale = args
    return (q.to(dtype), [(k.to(dtype), v.to(dtype)) for k, v in kv], dout.to(dtype), dlse.to(dtype), scale)


# ----------------------------------------------------------------------------- neighborhood


def _na_run(q, k, v, rpb, dout, opkw, scale, backend, grads, fn=None):
    import torch
    import dcal.ops
    from dcal.ops import reference

    leaves = [q, k, v] + ([rpb] if rpb is not None else [])
    if grads:
        leaves = [t.detach().requires_grad_() for t in leaves]
    xq, xk, xv = leaves[:3]
    xr = leaves[3] if rpb is not None else None
    if fn is not None:
        call = fn
    elif backend == "reference":
        call = lambda a, b, c_, r: reference.neighborhood_attention2d(a, b, c_, rpb=r, scale=scale, **opkw)
    else:
        call = lambda a, b, c_, r: dcal.ops.neighborhood_attention2d(
            a, b, c_, rpb=r, scale=scale, backend=backend, **opkw
        )
    with torch.set_grad_enabled(grads):
        out = call(xq, xk, xv, xr)
        res = {"out": out.detach()}
        if grads:
            gs = torch.autograd.grad(_dot(out, dout), leaves)
            res.update(dict(zip(["dq", "dk", "dv", "drpb"], gs)))
    return res


def run_neighborhood(run, fn=None):
    import torch

    c, device = run["case"], run["device"]
    dtype = getattr(torch, run["dtype"])
    q, k, v, rpb, dout, opkw, scale = c.inputs(dtype, device)
    with nan_poison(run["backend"]):
        mine = _na_run(q, k, v, rpb, dout, opkw, scale, run["backend"], c.grads, fn)
        _sync(device)
    return dict(inputs=(q, k, v, rpb, dout, opkw, scale), mine=mine)


def judge_neighborhood(run, inputs, mine, seconds):
    import torch

    c = run["case"]
    q, k, v, rpb, dout, opkw, scale = inputs
    B, H = q.shape[:2]
    batches = list(c.sample) if c.sample else list(range(B))
    ks = opkw.get("kernel_size", 7)
    per_head = q.shape[2] * q.shape[3] * ks * ks * q.shape[4]
    hper = max(1, int(2**27 // per_head))  # ~1 GiB of fp64 windows a slice
    meters: Dict[str, Meter] = {}
    low_dtype = None if q.dtype == torch.float64 else q.dtype
    drpb = {"truth": None, "low": None}
    for b in batches:
        for h0, h1 in _chunks(H, hper):
            sl = lambda t: t[b : b + 1, h0:h1]
            r = rpb[h0:h1] if rpb is not None else None
            args = [sl(q), sl(k), sl(v), r, sl(dout)]
            truth = _na_run(*[a.double() if a is not None else None for a in args], opkw, scale, "reference", c.grads)
            low = _na_run(*args, opkw, scale, "reference", c.grads) if low_dtype is not None else None
            for name, t in truth.items():
                if name == "drpb":
                    for key, val in (("truth", t), ("low", None if low is None else low[name])):
                        if val is None:
                            continue
                        if drpb[key] is None:
                            drpb[key] = torch.zeros(rpb.shape, dtype=val.dtype, device=val.device)
                        drpb[key][h0:h1] += val
                    continue
                meters.setdefault(name, Meter()).add(sl(mine[name]), t, None if low is None else low[name])
            del truth, low
    rows = [_judge(run, n, m, seconds) for n, m in meters.items()]
    if drpb["truth"] is not None:
        m = Meter()
        if c.sample:
            rows.append(row(run, "drpb", "skip", detail="sampled case: drpb sums over every batch"))
        else:
            m.add(mine["drpb"], drpb["truth"], drpb["low"])
            rows.append(_judge(run, "drpb", m, seconds))
    return rows


# ----------------------------------------------------------------------------- rollout


def run_rollout(run, fn=None):
    import torch
    import dcal.ops

    c, device = run["case"], run["device"]
    dtype = getattr(torch, run["dtype"])
    qs, ks, lses, scale = c.inputs(dtype, device)
    call = fn or (lambda a, b, l_: dcal.ops.attention_rollout(a, b, lses=l_, scale=scale, backend=run["backend"]))
    with nan_poison(run["backend"]):
        out = call(qs, ks, lses)
        _sync(device)
    return dict(inputs=(qs, ks, lses, scale), mine={"out": out})


def judge_rollout(run, inputs, mine, seconds):
    import torch
    from dcal.ops import reference

    c = run["case"]
    qs, ks, lses, scale = inputs
    B = qs[0].shape[0]
    m = Meter()
    low_needed = qs[0].dtype != torch.float64
    for b in list(c.sample) if c.sample else range(B):
        sl = lambda ts: None if ts is None else [t[b : b + 1] for t in ts]
        truth = reference.attention_rollout([q.double() for q in sl(qs)], [k.double() for k in sl(ks)], scale=scale)
        low = reference.attention_rollout(sl(qs), sl(ks), lses=sl(lses), scale=scale) if low_needed else None
        m.add(mine["out"][b : b + 1], truth, low)
    extra = (
        ""
        if mine["out"].dtype in (torch.float32, torch.float64)
        else f"; output dtype {mine['out'].dtype}, expected fp32"
    )
    r = _judge(run, "out", m, seconds, extra)
    if extra:
        r["status"] = "fail"
    return [r]


FAMILY_FNS = {
    "attention": (run_attention, judge_attention),
    "neighborhood": (run_neighborhood, judge_neighborhood),
    "rollout": (run_rollout, judge_rollout),
}


# ----------------------------------------------------------------------------- one run


def _equal_rows(run, a, b, promise, seconds):
    import torch

    names = [n for n in a if not (promise == "all but drpb" and n == "drpb")]
    diff = 0.0
    bad = []
    for n in names:
        if not torch.equal(a[n], b[n]):
            bad.append(n)
            diff = max(diff, (a[n].double() - b[n].double()).abs().nan_to_num(float("inf")).max().item())
    if bad:
        return row(
            run, "determinism", "fail", diff, 0.0, seconds, f"two runs differ in {', '.join(bad)} (promised: {promise})"
        )
    return row(run, "determinism", "pass", 0.0, 0.0, seconds, f"bit-identical over two runs: {', '.join(names)}")


def _compiled_fn(run):
    """The op under torch.compile(fullgraph=True), in the calling convention of the family's runner."""
    import torch
    import dcal.ops

    op, backend = run["op"], run["backend"]
    cbackend = os.environ.get("DCAL_CHECK_COMPILE_BACKEND", "inductor")
    if run["case"].family == "attention":
        if op == G.PW:
            f = lambda q, kv: dcal.ops.pwca_attention(
                q, *kv[0], *kv[1], scale=run["scale"], return_lse=True, backend=backend
            )
        else:
            f = lambda q, kv: dcal.ops.multi_kv_attention(q, kv, scale=run["scale"], return_lse=True, backend=backend)
    elif run["case"].family == "neighborhood":
        opkw = {k: v for k, v in run["case"].kw.items() if k != "rpb"}
        f = lambda q, k, v, r: dcal.ops.neighborhood_attention2d(
            q, k, v, rpb=r, scale=run["scale"], backend=backend, **opkw
        )
    else:
        f = lambda qs, ks, lses: dcal.ops.attention_rollout(qs, ks, lses=lses, scale=run["scale"], backend=backend)
    return torch.compile(f, fullgraph=True, backend=cbackend), cbackend


def execute(run) -> List[dict]:
    import torch

    c = run["case"]
    if run["why"]:
        return [row(run, "compile" if run["kind"] == "compile" else "all", "skip", detail=run["why"])]
    runner, judge = FAMILY_FNS[c.family]
    t0 = time.perf_counter()
    if run["kind"] == "compile":
        torch._dynamo.reset()
        run = dict(run, scale=c.s["D"] ** -0.5 * (1.0 if c.family == "rollout" else 1.3))
        fn, cbackend = _compiled_fn(run)
        with torch._dynamo.config.patch(error_on_recompile=False):
            res = runner(run, fn)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = runner(run, fn)  # same shapes: must reuse the graph
        seconds = round(time.perf_counter() - t0, 3)
        rows = judge(run, res["inputs"], res["mine"], seconds)
        worst = max(rows, key=lambda r: (r["status"] != "pass", (r["max_err"] or 0) / max(r["tol"] or 1e-30, 1e-30)))
        failed = [r["check"] for r in rows if r["status"] not in ("pass", "skip")]
        status = "fail" if failed else "pass"
        detail = (
            f"torch.compile(fullgraph=True, backend={cbackend!r}), second call without recompiling; "
            f"worst: {worst['check']}" + (f"; failing: {', '.join(failed)}" if failed else "")
        )
        del again
        return [row(run, "compile", status, worst["max_err"], worst["tol"], seconds, detail)]
    res = runner(run)
    t_kernel = time.perf_counter() - t0
    rows = judge(run, res["inputs"], res["mine"], None)
    promise = G.determinism_promise(c.op, run["backend"], run["device"])
    if c.det and promise:
        again = runner(run)["mine"]
        rows.append(_equal_rows(run, res["mine"], again, promise, None))
    seconds = time.perf_counter() - t0
    for r in rows:
        r["seconds"] = round(seconds, 3)
        r["detail"] = (r["detail"] + f"; kernel call {t_kernel:.2f} s").lstrip("; ")
    return rows


def _error_detail(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}{where}"


def cuda_context_ok() -> bool:
    """False after a sticky device fault (illegal address, device-side assert): every later CUDA
    call in this process would fail, so the worker must end and the parent start a new one."""
    import torch

    try:
        torch.cuda.synchronize()
        (torch.ones(1, device="cuda") + 1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


STICKY_FAULT_EXIT = 17


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.check.worker")
    p.add_argument("--family", required=True, choices=G.FAMILIES)
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--skip", default=None, help="file with run ids to leave out (one per line)")
    p.add_argument("--inject", default=None)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile checks")
    p.add_argument("--env-out", default=None, help="also write the environment block (dcal.check.env) here")
    p.add_argument("--ops", nargs="*", default=None)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--dtypes", nargs="*", default=None)
    p.add_argument("--tier", type=int, default=None, help="highest tier to run (default: the run's, see grid.run_tier)")
    a = p.parse_args(argv)
    if a.inject:
        runpy.run_path(a.inject, run_name="dcal_check_inject")
    write = Writer(a.out)
    if a.device == "cuda":
        import torch

        # the judging rule assumes IEEE fp32 matmuls in the references (PyTorch's default)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if a.env_out:
        from dcal.check.env import collect

        try:
            env = collect(a.device)
        except Exception as e:  # noqa: BLE001  (the grid still runs)
            env = {"error": _error_detail(e)}
        with open(a.env_out, "w") as f:
            json.dump(env, f, indent=1, default=str)
    runs = plan(a.family, a.device, a.quick, a.ops, a.only, a.backends, a.dtypes, a.tier)
    if a.no_compile:
        runs = [r for r in runs if r["kind"] != "compile"]
    skip = set()
    if a.skip and os.path.exists(a.skip):
        skip = set(open(a.skip).read().splitlines())
    write(event="plan", ids=[r["id"] for r in runs])
    for r in runs:
        if r["id"] in skip:
            continue
        write(event="start", id=r["id"])
        t0 = time.perf_counter()
        try:
            rows = execute(r)
        except Exception as e:  # the case's verdict, not the worker's end
            rows = [
                row(
                    r,
                    "run" if r["kind"] == "grid" else "compile",
                    "error",
                    seconds=round(time.perf_counter() - t0, 3),
                    detail=_error_detail(e),
                )
            ]
        for x in rows:
            write(event="row", **x)
        write(event="end", id=r["id"])
        if a.device == "cuda":
            if not cuda_context_ok():
                # the fault is recorded on the run that caused it (its synchronize raised);
                # the parent restarts a fresh process on the runs that remain
                write(event="fault", id=r["id"])
                os._exit(STICKY_FAULT_EXIT)
            import torch

            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
