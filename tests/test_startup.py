"""Start-up cost: ``import dcal`` (and dcal.nn, dcal.models, dcal.train) imports neither
torch._inductor nor triton (the Triton backends load on first use) nor timm (the DCAL ViTs are
registered with timm when timm is imported, in either order), the command lines answer ``--help`` within 1.5 s of ``import torch``, and a
Triton op whose first call comes from inside ``torch.compile(fullgraph=True)`` still traces in
one graph without a recompile.

Each check runs in a fresh interpreter (what is imported depends on the whole process) and
measures ``import torch`` in that same process, so a slow shared machine moves both numbers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 1.5


def _run(code: str, env=None, timeout=600) -> dict:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_dcal_imports_no_inductor_and_no_triton():
    got = _run("""
        import json, sys, time
        t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
        import dcal, dcal.ops, dcal.nn, dcal.models, dcal.train
        t2 = time.perf_counter()
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'timm') or m.startswith('torch._inductor'))
        print(json.dumps(dict(torch_s=t1 - t0, dcal_s=t2 - t1, heavy=heavy[:10])))
    """)
    assert got["heavy"] == [], f"import dcal pulled in {got['heavy']}"
    assert got["dcal_s"] < BUDGET_S, got


@pytest.mark.parametrize("module", ["dcal.train", "dcal.check"])
def test_help_within_budget_of_import_torch(module):
    got = _run(f"""
        import contextlib, io, json, runpy, sys, time
        t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
        sys.argv = [{module!r}, "--help"]
        buf = io.StringIO()
        code = None
        try:
            with contextlib.redirect_stdout(buf):
                runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        t2 = time.perf_counter()
        print(json.dumps(dict(torch_s=t1 - t0, help_s=t2 - t1, code=code, text=buf.getvalue()[:400],
                              inductor="torch._inductor" in sys.modules)))
    """)
    assert got["code"] in (0, None) and "usage:" in got["text"], got
    assert not got["inductor"]
    assert got["help_s"] < BUDGET_S, (
        f"python -m {module} --help took {got['help_s']:.2f} s after import torch ({got['torch_s']:.2f} s)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path; on a GPU test_pwca_triton compiles it")
def test_first_triton_call_inside_compile_traces_in_one_graph():
    env = dict(os.environ, TRITON_INTERPRET="1")
    got = _run(
        """
        import json, sys, torch
        import dcal.ops as ops
        assert "dcal.ops._triton_pwca" not in sys.modules  # not loaded yet: the compiled call loads it
        g = torch.Generator().manual_seed(0)
        q, k1, v1, k2, v2 = (torch.randn(1, 2, n, 16, generator=g) for n in (5, 3, 3, 4, 4))
        fn = torch.compile(lambda *a: ops.pwca_attention(*a, backend="triton"), fullgraph=True, backend="eager")
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            a = fn(q, k1, v1, k2, v2)
            eager = ops.pwca_attention(q, k1, v1, k2, v2, backend="triton")  # fills the eager cache
            b = fn(q * 2, k1, v1, k2, v2)  # same shapes after the eager call: no recompile
        ref = ops.reference.pwca_attention
        err = max((a - ref(q, k1, v1, k2, v2)).abs().max().item(), (eager - a).abs().max().item(),
                  (b - ref(q * 2, k1, v1, k2, v2)).abs().max().item())
        print(json.dumps(dict(err=err, loaded="dcal.ops._triton_pwca" in sys.modules)))
    """,
        env=env,
    )
    assert got["loaded"]
    assert got["err"] < 1e-5, got


@pytest.mark.parametrize("order", ["dcal_first", "timm_first"])
def test_dcal_vits_registered_with_timm_in_either_import_order(order):
    pytest.importorskip("timm")
    imports = "import dcal.models; import timm" if order == "dcal_first" else "import timm; import dcal.models"
    got = _run(f"""
        import json, sys
        {imports}
        import timm.models
        m = timm.create_model("dcal_vit_small_patch16_448", num_classes=7, device="meta")
        print(json.dumps(dict(names=timm.list_models("dcal_*"), cls=type(m).__name__, classes=m.head.out_features,
                              loader=type(timm.__spec__.loader).__name__, hooks=[type(h).__name__ for h in sys.meta_path])))
    """)
    assert got["names"] == ["dcal_vit_base_patch16_448", "dcal_vit_small_patch16_448"]
    assert got["cls"] == "DCALViT" and got["classes"] == 7
    assert got["loader"] == "SourceFileLoader" and "_AfterTimmImport" not in got["hooks"]  # the hook is gone


def test_triton_ops_can_be_defined_while_torch_compile_traces():
    """On a GPU the first Triton call may come from a compiled function: defining the triton_ops
    (which imports torch._inductor) inside the trace works and registers them."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    got = _run(
        """
        import json, sys, torch
        from dcal.ops import _dispatch
        impls = [_dispatch._IMPLS[(op, "triton")] for op in ("neighborhood_attention2d", "attention_rollout")]

        def f(x):
            for impl in impls:
                fn, why = impl.load()
                assert why is None, why
            return x * 2

        out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
        from torch._library.triton import triton_ops_to_kernels
        names = ("na2d_fwd_triton", "na2d_bwd_triton", "rollout_triton")
        print(json.dumps(dict(out=out.tolist(), triton_ops=sorted(k for k in triton_ops_to_kernels if k.startswith("dcal::")),
                              registered=[torch._C._dispatch_has_kernel_for_dispatch_key(f"dcal::{n}", "CPU") or
                                          torch._C._dispatch_has_kernel_for_dispatch_key(f"dcal::{n}", "CompositeExplicitAutograd")
                                          for n in names])))
    """,
        env=env,
    )
    assert got["out"] == [2.0, 2.0]
    assert got["triton_ops"] == ["dcal::na2d_bwd_triton", "dcal::na2d_fwd_triton", "dcal::rollout_triton"]
    assert all(got["registered"]), got
