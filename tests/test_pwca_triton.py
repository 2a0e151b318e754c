"""Triton PWCA / multi-segment attention (kernels/pwca.py, dcal/ops/_triton_pwca.py) against the
reference: forward, logsumexp and each of the five gradients, on odd token counts and head dims.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py), so
shapes stay small (B=1, H=2). The ahead-of-time compilation test runs in a subprocess without
the interpreter.
"""

import os
from typing import NamedTuple, Tuple

import pytest
import torch

import dcal.ops as ops
from dcal.ops import reference
from dcal.testing import FLOORS, assert_close_to_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cpu" if INTERPRET else "cuda"


# fp32 is compared with the fp64 truth by ``allclose`` at the fp32 floor; fp16/bf16 by the rule of
# dcal.testing.judging (2x / 3x the reference's own error in that dtype, plus the dtype's floor).
FP32 = FLOORS["float32"]
NAMES = ("q", "k1", "v1", "k2", "v2")


class Case(NamedTuple):
    nq: int
    segs: Tuple[int, ...]
    d: int
    dtype: torch.dtype

    @property
    def id(self):
        return f"{str(self.dtype)[6:]}-D{self.d}-q{self.nq}-k{'+'.join(map(str, self.segs))}"


# Each shape once per dtype, head dims rotated: odd token counts (1, 5, 37, 130 against tiles of
# 16..128), one and two segments, a short and a long first segment.
CASES = [
    Case(nq, segs, d, torch.float32)
    for nq, segs, d in [
        (1, (5, 130), 16),
        (37, (130, 5), 40),
        (130, (5, 130), 64),
        (37, (130,), 64),
        (130, (5,), 16),
        (37, (5, 130), 40),
    ]
]
CASES += [
    Case(nq, segs, d, torch.float16)
    for nq, segs, d in [
        (1, (5, 130), 40),
        (37, (130, 5), 64),
        (130, (5, 130), 16),
        (37, (130,), 16),
        (130, (5,), 40),
        (1, (130,), 64),
    ]
]
if not INTERPRET:  # triton 3.8's interpreter gets tl.dot of bf16 operands wrong, so bf16 runs on GPUs only
    CASES += [Case(37, (5, 130), 40, torch.bfloat16), Case(37, (130,), 64, torch.bfloat16)]
IDS = [c.id for c in CASES]


def _inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H = 1, 2
    ts = [torch.randn(B, H, case.nq, case.d, generator=g)]
    for n in case.segs:
        ts += [torch.randn(B, H, n, case.d, generator=g), torch.randn(B, H, n, case.d, generator=g)]
    dout = torch.randn(B, H, case.nq, case.d, generator=g)
    dlse = torch.randn(B, H, case.nq, generator=g)
    return [t.to(case.dtype) for t in ts], dout, dlse


def _ref_run(ts, dout, dlse, scale, dtype):
    """Reference forward and gradients of ``sum(out * dout) + sum(lse * dlse)`` in ``dtype``."""
    xs = [t.to(dtype).requires_grad_() for t in ts]
    kv = list(zip(xs[1::2], xs[2::2]))
    out, lse = reference.multi_kv_attention(xs[0], kv, scale=scale, return_lse=True)
    loss = (out.float() * dout.to(out.dtype).float()).sum() + (lse.float() * dlse).sum()
    grads = torch.autograd.grad(loss, xs)
    return out.detach(), lse.detach(), grads


_RESULTS = {}


def _run(case):
    """Kernel and references for one case, computed once and shared by the forward and the five
    gradient tests (the first caller runs it, under the NaN-poisoned allocator)."""
    if case in _RESULTS:
        return _RESULTS[case]
    ts, dout, dlse = _inputs(case)
    scale = case.d**-0.5 * 1.3  # not the default, so a dropped scale shows
    xs = [t.to(DEVICE).requires_grad_() for t in ts]
    kv = list(zip(xs[1::2], xs[2::2]))
    out, lse = ops.multi_kv_attention(xs[0], kv, scale=scale, return_lse=True, backend="triton")
    loss = (out.float() * dout.to(DEVICE, case.dtype).float()).sum() + (lse * dlse.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, xs)
    mine = (out.detach().cpu(), lse.detach().cpu(), [g.cpu() for g in grads])
    truth = _ref_run(ts, dout, dlse, scale, torch.float64)
    low = _ref_run(ts, dout, dlse, scale, case.dtype) if case.dtype != torch.float32 else None
    _RESULTS[case] = res = (mine, truth, low)
    return res


def _assert_close(name, case, got, truth, low):
    assert got.dtype == (torch.float32 if name == "lse" else case.dtype), f"{name} has dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{name} has non-finite entries (an unwritten output?)"
    if low is None:
        torch.testing.assert_close(
            got.double(), truth.double(), atol=FP32.atol, rtol=FP32.rtol, msg=lambda m: f"{name}: {m}"
        )
        return
    assert_close_to_reference(name, got, truth, low, dtype=case.dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward(case, nan_empty):
    (out, _, _), (t_out, _, _), low = _run(case)
    assert out.shape == t_out.shape
    _assert_close("out", case, out, t_out, None if low is None else low[0])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lse(case, nan_empty):
    (_, lse, _), (_, t_lse, _), low = _run(case)
    assert lse.shape == t_lse.shape == (1, 2, case.nq)
    _assert_close("lse", case, lse, t_lse, None if low is None else low[1])


GRAD_PARAMS = [pytest.param(c, w, id=f"{c.id}-d{NAMES[w]}") for c in CASES for w in range(1 + 2 * len(c.segs))]


@pytest.mark.parametrize("case,which", GRAD_PARAMS)
def test_grad(case, which, nan_empty):
    (_, _, grads), (_, _, t_grads), low = _run(case)
    name = "d" + NAMES[which]
    _assert_close(name, case, grads[which], t_grads[which], None if low is None else low[2][which])


@pytest.mark.parametrize("use", ["out", "lse"])
def test_grad_from_one_output(use, nan_empty):
    """Only out (no lse gradient: the pre-pass without dlse) or only lse (dout is absent) in the loss."""
    case = Case(37, (5, 130), 40, torch.float32)
    ts, dout, dlse = _inputs(case, seed=1)
    xs = [t.to(DEVICE).requires_grad_() for t in ts]
    rs = [t.double().requires_grad_() for t in ts]
    outs = []
    for x, f in ((xs, lambda *a, **k: ops.pwca_attention(*a, **k, backend="triton")), (rs, reference.pwca_attention)):
        out, lse = f(*x, return_lse=True)
        loss = (out * dout.to(out)).sum() if use == "out" else (lse * dlse.to(lse)).sum()
        grads = torch.autograd.grad(loss, x, allow_unused=True)  # lse does not depend on v
        outs.append([torch.zeros_like(t) if g is None else g for t, g in zip(x, grads)])
    for name, g, r in zip(NAMES, *outs):
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_strided_qkv(nan_empty):
    """q, k, v as views of a packed qkv projection (reshape + permute), as the models produce them;
    the gradients flow back into the packed tensors."""
    B, N, H, D = 1, 23, 2, 40
    g = torch.Generator().manual_seed(2)
    packed = [torch.randn(B, n, 3, H, D, generator=g) for n in (N, N + 6)]

    def run(xa, xb, fn):
        (q, k1, v1), (_, k2, v2) = xa.permute(2, 0, 3, 1, 4), xb.permute(2, 0, 3, 1, 4)
        return fn(q, k1, v1, k2, v2)

    mine = [t.to(DEVICE).requires_grad_() for t in packed]
    out = run(*mine, lambda *a: ops.pwca_attention(*a, backend="triton"))
    refs = [t.double().requires_grad_() for t in packed]
    r_out = run(*refs, reference.pwca_attention)
    assert run(*mine, lambda q, *_: q.stride(-1) == 1 and not q.is_contiguous())
    torch.testing.assert_close(out.detach().cpu().double(), r_out.detach(), atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, mine, dout.to(out))
    r_grads = torch.autograd.grad(r_out, refs, dout.double())
    for name, a, b in zip(("packed qkv", "paired packed qkv"), grads, r_grads):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d({name}): {m}")


def test_three_segments_public_op(nan_empty):
    """More than two segments: the public op runs the kernel per pair of segments and merges."""
    g = torch.Generator().manual_seed(3)
    D = 24
    q = torch.randn(1, 2, 19, D, generator=g)
    kv = [(torch.randn(1, 2, n, D, generator=g), torch.randn(1, 2, n, D, generator=g)) for n in (7, 66, 3)]
    flat = [q] + [t for pair in kv for t in pair]
    xs = [t.to(DEVICE).requires_grad_() for t in flat]
    rs = [t.double().requires_grad_() for t in flat]
    out, lse = ops.multi_kv_attention(xs[0], list(zip(xs[1::2], xs[2::2])), return_lse=True, backend="triton")
    r_out, r_lse = reference.multi_kv_attention(rs[0], list(zip(rs[1::2], rs[2::2])), return_lse=True)
    torch.testing.assert_close(out.detach().cpu().double(), r_out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.detach().cpu().double(), r_lse.detach(), atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    mine = torch.autograd.grad((out * dout.to(out)).sum() + lse.sum(), xs)
    ref = torch.autograd.grad((r_out * dout.double()).sum() + r_lse.sum(), rs)
    for i, (a, b) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of input {i}: {m}")


def test_opcheck():
    from dcal.ops._triton_pwca import pwca_bwd_triton, pwca_fwd_triton

    g = torch.Generator().manual_seed(4)
    D = 16
    q = torch.randn(1, 2, 9, D, generator=g).to(DEVICE).requires_grad_()
    k1, v1 = (torch.randn(1, 2, 5, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    k2, v2 = (torch.randn(1, 2, 17, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    torch.library.opcheck(pwca_fwd_triton, (q, k1, v1, k2, v2, 0.3))
    with torch.no_grad():
        out, lse = pwca_fwd_triton(q, k1, v1, None, None, 0.3)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    torch.library.opcheck(
        pwca_bwd_triton,
        (dout, None, q.detach(), k1.detach(), v1.detach(), None, None, out, lse, 0.3),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(5)
    q, k1, v1, k2, v2 = (torch.randn(1, 2, n, 16, generator=g).to(DEVICE) for n in (11, 6, 6, 9, 9))
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: ops.pwca_attention(*a, backend="triton", return_lse=True), fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        out, lse = fn(q, k1, v1, k2, v2)
        out2, _ = fn(q * 2, k1, v1, k2, v2)  # same shapes: no recompile
    r_out, r_lse = reference.pwca_attention(q, k1, v1, k2, v2, return_lse=True)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, reference.pwca_attention(q * 2, k1, v1, k2, v2), atol=1e-5, rtol=1e-5)


def test_launcher_rejects_what_it_cannot_run():
    from dcal.kernels.pwca import pwca_fwd

    q = torch.randn(1, 1, 4, 20, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 20"):
        pwca_fwd(q, q, q)
    with pytest.raises(TypeError, match="float64"):
        pwca_fwd(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="k1 has no tokens"):
        pwca_fwd(torch.randn(1, 1, 4, 16, device=DEVICE), q.new_empty(1, 1, 0, 16), q.new_empty(1, 1, 0, 16))


# ----------------------------------------------------------------------------- compilation


_TRACE = r"""
import torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from dcal.ops._triton_pwca import mkv_triton, pwca_bwd_triton
graphs = []
with FakeTensorMode():
    q = torch.empty(1, 2, 37, 40, device="cuda", dtype=torch.float16)
    k = torch.empty(1, 2, 130, 40, device="cuda", dtype=torch.float16)
    lse = torch.empty(1, 2, 37, device="cuda")
    fn = lambda q, k, lse: (mkv_triton(q, k, k, k, k, 0.2), pwca_bwd_triton(q, lse, q, k, k, k, k, q, lse, 0.2))
    aot_function(fn, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)(q, k, lse)
print("@@" + graphs[0])
"""


def test_triton_op_traces_into_kernels():
    """Without the interpreter the ops are triton_ops: AOTAutograd (torch.compile's front end)
    decomposes them into the four kernel launches, on fake CUDA tensors, so no GPU is needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TRACE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    graph = res.stdout.split("@@", 1)[1]
    # forward; backward pre-pass, dk/dv once per segment, dq
    assert graph.count("triton_kernel_wrapper_functional(") == 5, graph
    for arg in ("'LSE':", "'DELTA':", "'DK':", "'DQ':", "'HAS_SEG2': True"):
        assert arg in graph, arg


@pytest.mark.slow
def test_aot_compile_all_specs():
    """Every launchable configuration compiles for sm_80 and sm_90 (no GPU needed); the D=64
    fp16/bf16 configurations, the ones the models run, must not spill."""
    from dcal.kernels.pwca import aot_specs
    from dcal.testing.aot import compile_in_subprocess

    from concurrent.futures import ThreadPoolExecutor

    n_specs = len(aot_specs())
    kernels = ("pwca_fwd", "pwca_bwd_dq", "pwca_bwd_dkdv", "pwca_bwd_preprocess")
    # ~170 compilations: one subprocess per kernel, as many at a time as there are cores
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        parts = pool.map(
            lambda k: compile_in_subprocess(modules=("dcal.kernels.pwca",), archs=(80, 90), name_filter=k), kernels
        )
        rows = [r for part in parts for r in part]
    assert len(rows) == 2 * n_specs
    names = {r["name"] for r in rows}
    assert names == {"pwca_fwd", "pwca_bwd_preprocess", "pwca_bwd_dkdv", "pwca_bwd_dq"}
    for r in rows:
        assert r["cubin_bytes"] > 0
        limit = 232448 if r["arch"] == "sm_90" else 166912  # opt-in shared memory per block
        assert r["shared"] <= limit, f"{r['name']} {r['label']} on {r['arch']} needs {r['shared']} B of shared memory"
    hot = [r for r in rows if r["label"]["BLOCK_D"] == 64 and r["label"]["dtype"] in ("fp16", "bf16")]
    assert hot
    spilling = [(r["name"], r["arch"], r["label"], r["spill_bytes"]) for r in hot if r["spill_bytes"]]
    assert not spilling, f"D=64 fp16/bf16 configurations spill: {spilling}"
