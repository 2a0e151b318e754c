"""Bad and borderline inputs, on every CPU backend: the table runs in worker subprocesses, so an input
that ends the process (a floating point exception in a kernel, a segfault) fails its own case
instead of the test run. Each case asserts: the process survives, nothing is printed on stdout
(C-level prints included: file descriptor 1 is redirected around every case), and the call either
raises a TypeError/ValueError whose message names the argument, or returns the defined empty
result (with zero gradients where the case asks).

Also here (in process): the regressions behind the table (NaN rows on sdpa, the layout of the
reference's gradients, fp16 on CPU taking the fused C++ kernels) and that an empty result calls
no backend kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import dcal.ops as ops
from dcal import _ext

CPU_MKV = [None, "reference", "sdpa"] + (["cpp"] if _ext.HAS_EXTENSION else [])
CPU_OTHER = [None, "reference"] + (["cpp"] if _ext.HAS_EXTENSION else [])

# ----------------------------------------------------------------------------- the table
# (id, code, expectation). The code sees torch, ops, t(*shape, dtype=...) (random), BACKEND, and
# sets `res` when it returns. Expectations: ("raises", "ValueError" | "TypeError", needle in the
# message) or ("empty", shape of res) or ("ok",).

MKV = "ops.multi_kv_attention"
NA = "ops.neighborhood_attention2d"
RO = "ops.attention_rollout"


def _mkv_cases():
    q4 = "t(1, 2, 5, 16)"
    kv = "[(t(1, 2, 3, 16), t(1, 2, 3, 16))]"
    c = [
        (
            "zero-heads-bf16",
            "q = t(2, 0, 5, 16, dtype=torch.bfloat16); res = " + MKV + "(q, [(q, q)], backend=BACKEND)",
            ("empty", (2, 0, 5, 16)),
        ),
        ("zero-heads", "q = t(2, 0, 5, 16); res = " + MKV + "(q, [(q, q)], backend=BACKEND)", ("empty", (2, 0, 5, 16))),
        ("zero-batch", "q = t(0, 2, 5, 16); res = " + MKV + "(q, [(q, q)], backend=BACKEND)", ("empty", (0, 2, 5, 16))),
        (
            "zero-queries-grads",
            textwrap.dedent("""
            q = t(1, 2, 0, 16).requires_grad_(); k = t(1, 2, 4, 16).requires_grad_(); v = t(1, 2, 4, 16).requires_grad_()
            res, lse = ops.multi_kv_attention(q, [(k, v)], backend=BACKEND, return_lse=True)
            assert lse.shape == (1, 2, 0)
            g = torch.autograd.grad(res.sum() + lse.sum(), [q, k, v])
            assert [tuple(x.shape) for x in g] == [(1, 2, 0, 16), (1, 2, 4, 16), (1, 2, 4, 16)]
            assert all(bool((x == 0).all()) for x in g)"""),
            ("empty", (1, 2, 0, 16)),
        ),
        (
            "one-segment-without-keys",
            textwrap.dedent("""
            q = t(1, 2, 5, 16, dtype=torch.float64).requires_grad_(); k = t(1, 2, 4, 16, dtype=torch.float64)
            e = t(1, 2, 0, 16, dtype=torch.float64).requires_grad_()
            res = ops.multi_kv_attention(q, [(k, k), (e, e)], backend=BACKEND)
            want = ops.multi_kv_attention(q, [(k, k)], backend="reference")
            assert torch.allclose(res, want, atol=1e-9, rtol=0)
            g = torch.autograd.grad(res.sum(), [e])
            assert g[0].shape == (1, 2, 0, 16)"""),
            ("ok",),
        ),
        (
            "no-key-at-all",
            "q = t(1, 2, 5, 16); e = t(1, 2, 0, 16); res = " + MKV + "(q, [(e, e), (e, e)], backend=BACKEND)",
            ("raises", "ValueError", "kv"),
        ),
        (
            "headdim0-scale-none",
            "q = t(2, 3, 5, 0); res = " + MKV + "(q, [(q, q)], backend=BACKEND)",
            ("raises", "ValueError", "head dim"),
        ),
        (
            "headdim0-scale-given",
            "q = t(2, 3, 5, 0); res = " + MKV + "(q, [(q, q)], scale=0.5, backend=BACKEND)",
            ("raises", "ValueError", "q has head dim 0"),
        ),
        (
            "scale-nan",
            f"res = {MKV}({q4}, {kv}, scale=float('nan'), backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        (
            "scale-inf",
            f"res = {MKV}({q4}, {kv}, scale=float('inf'), backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        (
            "scale--inf",
            f"res = {MKV}({q4}, {kv}, scale=-float('inf'), backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        (
            "scale-overflows-fp32",
            f"res = {MKV}({q4}, {kv}, scale=1e39, backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        ("scale-str", f"res = {MKV}({q4}, {kv}, scale='0.1', backend=BACKEND)", ("raises", "TypeError", "scale")),
        ("scale-bool", f"res = {MKV}({q4}, {kv}, scale=True, backend=BACKEND)", ("raises", "TypeError", "scale")),
        (
            "q-int",
            f"res = {MKV}(torch.ones(1, 2, 5, 16, dtype=torch.int64), {kv}, backend=BACKEND)",
            ("raises", "TypeError", "q"),
        ),
        ("q-sparse", f"res = {MKV}({q4}.to_sparse(), {kv}, backend=BACKEND)", ("raises", "TypeError", "q")),
        ("q-3d", f"res = {MKV}(t(2, 5, 16), {kv}, backend=BACKEND)", ("raises", "ValueError", "q")),
        ("q-none", f"res = {MKV}(None, {kv}, backend=BACKEND)", ("raises", "TypeError", "q")),
        ("kv-tensor", f"res = {MKV}({q4}, {q4}, backend=BACKEND)", ("raises", "TypeError", "kv")),
        ("kv-empty", f"res = {MKV}({q4}, [], backend=BACKEND)", ("raises", "ValueError", "kv")),
        ("kv-generator-of-non-pairs", f"res = {MKV}({q4}, [1, 2], backend=BACKEND)", ("raises", "TypeError", "kv[0]")),
        (
            "k-heads",
            f"res = {MKV}({q4}, [(t(1, 3, 3, 16), t(1, 3, 3, 16))], backend=BACKEND)",
            ("raises", "ValueError", "kv[0][0] (k)"),
        ),
        (
            "v-length",
            f"res = {MKV}({q4}, [(t(1, 2, 3, 16), t(1, 2, 4, 16))], backend=BACKEND)",
            ("raises", "ValueError", "kv[0][1] (v)"),
        ),
        (
            "k-dtype",
            f"res = {MKV}({q4}, [(t(1, 2, 3, 16, dtype=torch.float64), t(1, 2, 3, 16))], backend=BACKEND)",
            ("raises", "TypeError", "kv[0][0] (k)"),
        ),
        (
            "return-lse-str",
            f"res = {MKV}({q4}, {kv}, return_lse='yes', backend=BACKEND)",
            ("raises", "TypeError", "return_lse"),
        ),
        (
            "nan-inputs-run",
            textwrap.dedent(f"""
            q = {q4}; q[0, 1, 2, 3] = float('nan'); k = t(1, 2, 3, 16); k[0, 0, 1, 1] = float('inf')
            res = ops.multi_kv_attention(q, [(k, k)], backend=BACKEND)
            assert torch.isnan(res[0, 1, 2]).all()"""),
            ("ok",),
        ),
    ]
    out = []
    for cid, code, want in c:
        backends = [b for b in CPU_MKV if not (cid.endswith("bf16") and b == "cpp")]
        out += [(f"mkv-{cid}-{b}", code, want, b) for b in backends]
    return out


def _na_cases():
    x5 = "t(1, 2, 6, 7, 16)"
    qkv = f"{x5}, {x5}, {x5}"
    c = [
        (
            "zero-batch",
            f"q = t(0, 2, 6, 7, 16); res = {NA}(q, q, q, kernel_size=3, backend=BACKEND)",
            ("empty", (0, 2, 6, 7, 16)),
        ),
        (
            "zero-heads",
            f"q = t(2, 0, 6, 7, 16); res = {NA}(q, q, q, kernel_size=3, backend=BACKEND)",
            ("empty", (2, 0, 6, 7, 16)),
        ),
        (
            "zero-rows-clamp",
            f"q = t(1, 2, 0, 7, 16); res = {NA}(q, q, q, kernel_size=3, border='clamp', backend=BACKEND)",
            ("empty", (1, 2, 0, 7, 16)),
        ),
        (
            "zero-cols-grads",
            textwrap.dedent(f"""
            q = t(1, 2, 5, 0, 8).requires_grad_(); rpb = t(2, 5, 5).requires_grad_()
            res = {NA}(q, q, q, kernel_size=3, rpb=rpb, backend=BACKEND)
            g = torch.autograd.grad(res.sum(), [q, rpb])
            assert g[1].shape == (2, 5, 5) and bool((g[1] == 0).all())"""),
            ("empty", (1, 2, 5, 0, 8)),
        ),
        (
            "headdim0",
            f"q = t(1, 2, 6, 7, 0); res = {NA}(q, q, q, kernel_size=3, backend=BACKEND)",
            ("raises", "ValueError", "head dim"),
        ),
        (
            "headdim0-scale",
            f"q = t(1, 2, 6, 7, 0); res = {NA}(q, q, q, kernel_size=3, scale=1.0, backend=BACKEND)",
            ("raises", "ValueError", "head dim"),
        ),
        (
            "ks-huge",
            f"res = {NA}({qkv}, kernel_size=2**15 + 1, backend=BACKEND)",
            ("raises", "ValueError", "kernel_size"),
        ),
        ("ks-negative", f"res = {NA}({qkv}, kernel_size=-3, backend=BACKEND)", ("raises", "ValueError", "kernel_size")),
        ("ks-even", f"res = {NA}({qkv}, kernel_size=4, backend=BACKEND)", ("raises", "ValueError", "kernel_size")),
        ("ks-float", f"res = {NA}({qkv}, kernel_size=3.0, backend=BACKEND)", ("raises", "TypeError", "kernel_size")),
        ("ks-numpy-ok", f"import numpy as np; res = {NA}({qkv}, kernel_size=np.int64(3), backend=BACKEND)", ("ok",)),
        (
            "dilation-0",
            f"res = {NA}({qkv}, kernel_size=3, dilation=0, backend=BACKEND)",
            ("raises", "ValueError", "dilation"),
        ),
        (
            "dilation-huge",
            f"res = {NA}({qkv}, kernel_size=3, dilation=2**15, backend=BACKEND)",
            ("raises", "ValueError", "dilation"),
        ),
        (
            "dilation-none",
            f"res = {NA}({qkv}, kernel_size=3, dilation=None, backend=BACKEND)",
            ("raises", "TypeError", "dilation"),
        ),
        (
            "border-none",
            f"res = {NA}({qkv}, kernel_size=3, border=None, backend=BACKEND)",
            ("raises", "ValueError", "border"),
        ),
        (
            "border-list",
            f"res = {NA}({qkv}, kernel_size=3, border=['zero'], backend=BACKEND)",
            ("raises", "ValueError", "border"),
        ),
        (
            "clamp-small",
            f"res = {NA}({qkv}, kernel_size=5, dilation=2, border='clamp', backend=BACKEND)",
            ("raises", "ValueError", "clamp"),
        ),
        (
            "rpb-int",
            f"res = {NA}({qkv}, kernel_size=3, rpb=torch.zeros(2, 5, 5, dtype=torch.int32), backend=BACKEND)",
            ("raises", "TypeError", "rpb"),
        ),
        ("rpb-2d", f"res = {NA}({qkv}, kernel_size=3, rpb=t(5, 5), backend=BACKEND)", ("raises", "ValueError", "rpb")),
        ("rpb-list", f"res = {NA}({qkv}, kernel_size=3, rpb=[[0.0]], backend=BACKEND)", ("raises", "TypeError", "rpb")),
        (
            "scale-nan",
            f"res = {NA}({qkv}, kernel_size=3, scale=float('nan'), backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        (
            "v-shape",
            f"res = {NA}({x5}, {x5}, t(1, 2, 6, 6, 16), kernel_size=3, backend=BACKEND)",
            ("raises", "ValueError", "v"),
        ),
        (
            "k-int",
            f"res = {NA}({x5}, torch.ones(1, 2, 6, 7, 16, dtype=torch.int64), {x5}, kernel_size=3, backend=BACKEND)",
            ("raises", "TypeError", "k"),
        ),
        (
            "nan-inputs-run",
            textwrap.dedent(f"""
            q = {x5}; q[0, 1, 2, 3, 4] = float('nan')
            res = {NA}(q, {x5}, {x5}, kernel_size=3, backend=BACKEND)
            assert torch.isnan(res[0, 1, 2, 3]).all() and int(torch.isnan(res).sum()) == 16"""),
            ("ok",),
        ),
    ]
    return [(f"na-{cid}-{b}", code, want, b) for cid, code, want in c for b in CPU_OTHER]


def _rollout_cases():
    q = "t(1, 2, 5, 16)"
    c = [
        ("zero-tokens", f"q = t(1, 2, 0, 16); res = {RO}([q], [q], backend=BACKEND)", ("empty", (1, 0))),
        ("zero-batch", f"q = t(0, 2, 5, 16); res = {RO}([q], [q], backend=BACKEND)", ("empty", (0, 5))),
        ("zero-heads", f"q = t(1, 0, 5, 16); res = {RO}([q], [q], backend=BACKEND)", ("raises", "ValueError", "qs[0]")),
        ("headdim0", f"q = t(1, 2, 5, 0); res = {RO}([q], [q], backend=BACKEND)", ("raises", "ValueError", "qs[0]")),
        (
            "lses-int",
            f"res = {RO}([{q}], [{q}], lses=[torch.zeros(1, 2, 5, dtype=torch.int64)], backend=BACKEND)",
            ("raises", "TypeError", "lses[0]"),
        ),
        (
            "lses-shape",
            f"res = {RO}([{q}], [{q}], lses=[t(1, 2, 4)], backend=BACKEND)",
            ("raises", "ValueError", "lses[0]"),
        ),
        ("lses-tensor", f"res = {RO}([{q}], [{q}], lses=t(1, 2, 5), backend=BACKEND)", ("raises", "TypeError", "lses")),
        ("qs-empty", f"res = {RO}([], [], backend=BACKEND)", ("raises", "ValueError", "qs")),
        ("qs-tensor", f"res = {RO}({q}, [{q}], backend=BACKEND)", ("raises", "TypeError", "qs")),
        ("ks-none", f"res = {RO}([{q}], None, backend=BACKEND)", ("raises", "TypeError", "ks")),
        (
            "ks-dtype",
            f"res = {RO}([{q}], [t(1, 2, 5, 16, dtype=torch.float64)], backend=BACKEND)",
            ("raises", "TypeError", "ks[0]"),
        ),
        (
            "scale-nan",
            f"res = {RO}([{q}], [{q}], scale=float('nan'), backend=BACKEND)",
            ("raises", "ValueError", "scale"),
        ),
        (
            "residual-nan",
            f"res = {RO}([{q}], [{q}], residual=float('nan'), backend=BACKEND)",
            ("raises", "ValueError", "residual"),
        ),
        (
            "residual-str",
            f"res = {RO}([{q}], [{q}], residual='0.5', backend=BACKEND)",
            ("raises", "ValueError", "residual"),
        ),
    ]
    return [(f"rollout-{cid}-{b}", code, want, b) for cid, code, want in c for b in CPU_OTHER]


def _explain_cases():
    q = "t(1, 2, 5, 16)"
    c = []
    for fn in ("ops.explain", "ops.chosen_backend"):
        name = fn.split(".")[1]
        c += [
            (f"{name}-unknown-op", f"res = {fn}('attention', {q})", ("raises", "ValueError", "op")),
            (f"{name}-op-none", f"res = {fn}(None, {q})", ("raises", "ValueError", "op")),
            (f"{name}-no-tensor", f"res = {fn}('pwca_attention')", ("raises", "TypeError", "tensors")),
            (f"{name}-list", f"res = {fn}('attention_rollout', [{q}, {q}])", ("raises", "TypeError", "tensors")),
            (f"{name}-not-tensor", f"res = {fn}('neighborhood_attention2d', 3)", ("raises", "TypeError", "tensors[0]")),
            (
                f"{name}-0dim",
                f"res = {fn}('pwca_attention', torch.tensor(1.0))",
                ("raises", "ValueError", "tensors[0]"),
            ),
            (
                f"{name}-backend",
                f"res = {fn}('pwca_attention', {q}, backend='fast')",
                ("raises", "ValueError", "backend"),
            ),
        ]
    return [(cid, code, want, None) for cid, code, want in c]


CASES = _mkv_cases() + _na_cases() + _rollout_cases() + _explain_cases()

# ----------------------------------------------------------------------------- the worker

WORKER = r"""
import json, os, sys, tempfile, traceback
cases_file, out_file, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
import dcal.ops as ops
cases = json.load(open(cases_file))
_g = torch.Generator().manual_seed(0)
def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_g, dtype=torch.float64).to(dtype)
out = open(out_file, "a")
def record(d):
    out.write(json.dumps(d) + "\n"); out.flush(); os.fsync(out.fileno())
cap = tempfile.TemporaryFile()
real_fd1 = os.dup(1)
for i in range(first, len(cases)):
    cid, code, backend = cases[i]
    record({"i": i, "event": "start"})
    sys.stdout.flush(); cap.seek(0); cap.truncate(); os.dup2(cap.fileno(), 1)
    env = {"torch": torch, "ops": ops, "t": t, "BACKEND": backend}
    res = {"i": i, "event": "end"}
    try:
        exec(code, env)
        r = env.get("res")
        res.update(status="returned", shape=list(r.shape) if isinstance(r, torch.Tensor) else None,
                   numel=r.numel() if isinstance(r, torch.Tensor) else None)
    except BaseException as e:
        res.update(status="raised", exc_type=type(e).__name__, msg=str(e), tb=traceback.format_exc()[-2000:])
    sys.stdout.flush(); os.dup2(real_fd1, 1)
    cap.seek(0); res["stdout"] = cap.read().decode(errors="replace")
    record(res)
"""


@pytest.fixture(scope="module")
def table_results(tmp_path_factory):
    """Runs every case in worker processes; a worker that dies is replaced, starting after the case
    that killed it (recorded as a crash with the exit status)."""
    d = tmp_path_factory.mktemp("inputs")
    cases_file, out_file, worker = d / "cases.json", d / "results.jsonl", d / "worker.py"
    cases_file.write_text(json.dumps([[cid, code, b] for cid, code, _, b in CASES]))
    worker.write_text(WORKER)
    results, first = {}, 0
    while first < len(CASES):
        proc = subprocess.run(
            [sys.executable, str(worker), str(cases_file), str(out_file), str(first)], capture_output=True, timeout=600
        )
        started = None
        for line in out_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] == "start":
                started = rec["i"]
            else:
                results[rec["i"]] = rec
                started = None
        if proc.returncode == 0 and len(results) >= len(CASES):
            break
        crashed = started if started is not None else first
        results[crashed] = {
            "status": "crashed",
            "returncode": proc.returncode,
            "stderr": proc.stderr.decode(errors="replace")[-2000:],
        }
        out_file.write_text("")
        first = crashed + 1
    return results


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_table(table_results, index):
    cid, code, want, backend = CASES[index]
    r = table_results.get(index)
    assert r is not None, f"{cid}: no result recorded"
    assert r["status"] != "crashed", f"{cid}: the process died (exit {r['returncode']}): {r['stderr']}"
    assert r["stdout"] == "", f"{cid}: printed on stdout: {r['stdout'][:500]!r}"
    if want[0] == "raises":
        assert r["status"] == "raised", f"{cid}: returned {r.get('shape')}, expected {want[1]} naming {want[2]!r}"
        assert r["exc_type"] == want[1], f"{cid}: raised {r['exc_type']}: {r['msg']}\n{r['tb']}"
        assert want[2] in r["msg"], f"{cid}: the message does not name {want[2]!r}: {r['msg']}"
    else:
        assert r["status"] == "returned", f"{cid}: raised {r.get('exc_type')}: {r.get('msg')}\n{r.get('tb')}"
        if want[0] == "empty":
            assert tuple(r["shape"]) == tuple(want[1]) and r["numel"] == 0, f"{cid}: got shape {r['shape']}"


def test_table_detects_a_crash_and_a_print(tmp_path):
    """The worker harness itself: a case that kills the process and one that prints from C are
    reported as such, and the cases after them still run."""
    import dcal  # noqa: F401  (the worker imports it)

    cases = [
        ["dies", "import os; os.kill(os.getpid(), 8)", None],
        ["prints", "import ctypes; ctypes.CDLL(None).puts(b'MKL says hi'); res = None", None],
        ["fine", "res = torch.zeros(0)", None],
    ]
    cf, of, w = tmp_path / "c.json", tmp_path / "r.jsonl", tmp_path / "w.py"
    cf.write_text(json.dumps(cases))
    w.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(w), str(cf), str(of), "0"], capture_output=True, timeout=300)
    assert proc.returncode != 0
    recs = [json.loads(x) for x in of.read_text().splitlines()]
    assert recs[-1] == {"i": 0, "event": "start"}  # started, never ended: the harness calls it a crash
    of.write_text("")
    subprocess.run([sys.executable, str(w), str(cf), str(of), "1"], capture_output=True, timeout=300, check=True)
    recs = [json.loads(x) for x in of.read_text().splitlines() if '"end"' in x]
    assert "MKL says hi" in recs[0]["stdout"] and recs[1]["stdout"] == "" and recs[1]["status"] == "returned"


# ----------------------------------------------------------------------------- regressions in process


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_sdpa_propagates_a_nan_query_row(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(dtype) for _ in range(3))
    q[0, 1, 2, 5] = float("nan")
    q.requires_grad_()
    out = ops.multi_kv_attention(q, [(k, v)], backend="sdpa")
    bad = ~torch.isfinite(out)
    assert bad[0, 1, 2].all() and int(bad.sum()) == 16, "exactly the NaN query's row is NaN"
    (dq,) = torch.autograd.grad(out, [q], torch.ones_like(out))
    assert (~torch.isfinite(dq)).sum() == 16 and (~torch.isfinite(dq[0, 1, 2])).all()


def test_sdpa_finite_inputs_still_take_sdpa(monkeypatch):
    """The exact path is for non-finite inputs only."""
    from dcal.ops import _sdpa

    monkeypatch.setattr(_sdpa, "_exact_fwd", lambda *a: (_ for _ in ()).throw(AssertionError("exact path taken")))
    q = torch.randn(1, 2, 6, 16, dtype=torch.bfloat16)
    ops.multi_kv_attention(q, [(q, q)], backend="sdpa")


@pytest.mark.parametrize("op", ["mkv", "na2d"])
def test_empty_result_calls_no_kernel(op, monkeypatch):
    from dcal.ops import _dispatch

    def boom(*a, **k):
        raise AssertionError("a backend kernel was called for an empty result")

    for impl in _dispatch._IMPLS.values():
        monkeypatch.setattr(impl, "_loaded", (boom, None))
    if op == "mkv":
        q = torch.randn(2, 0, 5, 16, requires_grad=True)
        out = ops.multi_kv_attention(q, [(q, q)])
    else:
        q = torch.randn(1, 2, 0, 4, 8, requires_grad=True)
        out = ops.neighborhood_attention2d(q, q, q, kernel_size=3)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
def test_fp16_on_cpu_takes_the_fused_cpp_kernels():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    assert ops.chosen_backend("multi_kv_attention", q.half()) == "cpp"
    assert ops.chosen_backend("attention_rollout", q.half()) == "cpp"
    x = torch.randn(1, 2, 5, 6, 16, generator=g)
    assert ops.chosen_backend("neighborhood_attention2d", x.half()) == "cpp"
    # the fp32 kernels on the fp16 values: the result is the fp32 result rounded to fp16
    qh, kh, vh = (t.half().requires_grad_() for t in (q, k, v))
    out = ops.multi_kv_attention(qh, [(kh, vh)])
    want = ops.multi_kv_attention(qh.float(), [(kh.float(), vh.float())], backend="cpp")
    assert out.dtype == torch.float16 and torch.equal(out, want.half())
    (dq,) = torch.autograd.grad(out, [qh], torch.ones_like(out))
    assert dq.dtype == torch.float16
    xo = ops.neighborhood_attention2d(x.half(), x.half(), x.half(), kernel_size=3)
    xw = ops.neighborhood_attention2d(x.half().float(), x.half().float(), x.half().float(), kernel_size=3)
    assert xo.dtype == torch.float16 and torch.equal(xo, xw.half())
    ro = ops.attention_rollout([q.half()], [k.half()])
    assert torch.equal(ro, ops.attention_rollout([q.half().float()], [k.half().float()]))


def test_reference_gradients_follow_the_layout_rule():
    """The reference backend's gradients come back in the dim order of their inputs, as the fused
    backends' do (here: views of one packed [B, N, 3, H, D] projection)."""
    qkv = torch.randn(2, 7, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = ops.multi_kv_attention(q, [(k, v)], backend="reference")
    grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    for g in (out,) + grads:
        assert g.stride() == (112, 8, 16, 1), g.stride()  # [B, N, H, D] in memory, like q
    x = torch.randn(1, 5, 6, 3, 2, 8, dtype=torch.float64, requires_grad=True)  # [B, X, Y, 3, H, D]
    q, k, v = (x[:, :, :, i].permute(0, 3, 1, 2, 4) for i in range(3))
    out = ops.neighborhood_attention2d(q, k, v, kernel_size=3, backend="reference")
    for g in torch.autograd.grad(out, [q, k, v], torch.ones_like(out)):
        assert g.stride() == (480, 8, 96, 16, 1), g.stride()
