"""``python -m dcal.check`` catches a broken backend: patched to return a wrong value, to leave its
output unwritten, to raise, and to kill its process. The patches reach the worker subprocesses through ``--inject``
(a file every worker runs before its cases). One run of the command on a tiny subset (a few
cases, fp32/fp64, no Triton, no benchmarks) is shared by the tests below.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INJECT = textwrap.dedent("""
    import os
    import torch
    from dcal.ops import _dispatch

    def patch(op, backend, make):
        impl = _dispatch._IMPLS[(op, backend)]
        fn, why = impl.load()
        impl._loaded = (make(fn), why)

    def cpp(fn):
        def f(q, *rest):
            if q.dtype == torch.float64:
                os._exit(3)  # a crash of the whole worker process
            out, lse = fn(q, *rest)
            return out + 1e-3, lse  # a wrong forward value (a constant shift: the gradients stay right)
        return f

    def sdpa(fn):
        def f(q, *rest):
            if q.dtype == torch.float32:
                raise RuntimeError("injected failure")
            out, lse = fn(q, *rest)
            # an output the kernel "forgot" to write: whatever a fresh allocation holds (times 0,
            # so the gradients stay right); the checker NaN-fills fresh allocations
            return out + torch.empty_like(out) * 0, lse
        return f

    patch("multi_kv_attention", "cpp", cpp)
    patch("multi_kv_attention", "sdpa", sdpa)
""")


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """One PWCA case on the cpp and sdpa backends in fp32 and fp64, compile checks with
    AOTAutograd only (DCAL_CHECK_COMPILE_BACKEND; Inductor's C++ build would add seconds)."""
    d = tmp_path_factory.mktemp("check")
    inject = d / "inject.py"
    inject.write_text(INJECT)
    args = ["--ops", "attention", "--only", "Nq37", "--backends", "cpp", "sdpa"]
    args += ["--dtypes", "float32", "float64", "--inject", str(inject)]
    res = _check(args, d)
    out = d / "out"
    report = json.loads((out / "report.json").read_text())
    return res, report, (out / "report.md").read_text()


def _key(r):
    return (r["op"], r["backend"], r["dtype"], r["check"])


def test_exit_status_nonzero(broken_run):
    res, _, _ = broken_run
    assert res.returncode == 1, res.stdout + res.stderr


def test_exactly_the_broken_cases_fail_or_error(broken_run):
    _, report, _ = broken_run
    cases = report["cases"]
    fails = {_key(r) for r in cases if r["status"] == "fail"}
    errors = {_key(r) for r in cases if r["status"] == "error"}
    # the shifted forward fails, eager and compiled, and so does the unwritten one; their
    # gradients pass
    assert fails == {
        ("pwca_attention", "cpp", "float32", "out"),
        ("pwca_attention", "cpp", "float32", "compile"),
        ("pwca_attention", "sdpa", "float64", "out"),
    }, fails
    assert errors == {
        ("pwca_attention", "cpp", "float64", "run"),  # the process died
        ("pwca_attention", "sdpa", "float32", "run"),
        ("pwca_attention", "sdpa", "float32", "compile"),
    }, errors
    by = {_key(r): r for r in cases}
    assert "injected failure" in by[("pwca_attention", "sdpa", "float32", "run")]["detail"]
    assert "non-finite" in by[("pwca_attention", "sdpa", "float64", "out")]["detail"]
    assert "exit status 3" in by[("pwca_attention", "cpp", "float64", "run")]["detail"]
    wrong = by[("pwca_attention", "cpp", "float32", "out")]
    assert wrong["max_err"] > wrong["tol"] and wrong["max_err"] == pytest.approx(1e-3, rel=1e-3)


def test_everything_else_ran_and_passed(broken_run):
    """The run went on past each failure: the gradients of the shifted forward pass, and the
    runs after the crash ran in a new worker."""
    _, report, _ = broken_run
    passed = {_key(r) for r in report["cases"] if r["status"] == "pass"}
    expected = {
        ("pwca_attention", "cpp", "float32", c) for c in ("lse", "dq", "dk1", "dv1", "dk2", "dv2", "determinism")
    }
    expected |= {("pwca_attention", "sdpa", "float64", c) for c in ("lse", "dq", "dk1", "dv1", "dk2", "dv2")}
    assert passed == expected, passed ^ expected
    rows = [(r["id"], r["check"]) for r in report["cases"]]
    assert len(rows) == len(set(rows)), "a run was recorded twice (the restarted worker re-ran it)"
    assert len({r["id"] for r in report["cases"]}) == 6  # 2 backends x 2 dtypes + 2 compile checks
    for r in report["cases"]:
        assert r["status"] in ("pass", "fail", "error", "skip")
        for field in ("op", "backend", "device", "dtype", "shape", "check", "status", "max_err", "tol", "seconds"):
            assert field in r


def test_report_says_a_hook_was_active(broken_run):
    _, report, md = broken_run
    assert report["env"]["injected"].endswith("inject.py")
    assert "test hook was active" in md and "FAILED" in md.splitlines()[0]
    assert report["bench"] == []


# ----------------------------------------------------------------------------- the grid table


def test_grid_lines_are_valid_and_unique():
    from dcal.check import grid as G

    seen = set()
    for c in G.GRID:
        key = (c.op, c.shape_str())
        assert key not in seen, key
        seen.add(key)
        assert c.op in G.FAMILY and c.tier in G.TIER_NAMES
        assert 16 <= c.s["D"] <= 128 and c.s["D"] % 8 == 0, c  # what the fused backends take
        assert c.dtypes is None or set(c.dtypes) <= set(G.DTYPES["cuda"]) | set(G.DTYPES["cpu"])
        if c.sample is not None:  # the sampled cases are the > 2**31-element ones
            assert c.numel() > 2**31 and not c.grads and all(0 <= b < c.s["B"] for b in c.sample), c
    assert {c.op for c in G.GRID if c.tier == G.TINY} == set(G.FAMILY)  # every op in every run
    for fam in G.FAMILIES:  # head dims 16/40/64/128 (their tile classes) on CPU --quick
        dims = {G.head_class(c.s["D"]) for c in G.select("cpu", True) if c.family == fam}
        assert dims >= {16, 64, 128}, (fam, dims)


def test_dilation_cases_wait_for_the_argument():
    import inspect

    import dcal.ops
    from dcal.check import grid as G

    dil = [c for c in G.GRID if "dilation" in c.kw]
    assert dil
    has = "dilation" in inspect.signature(dcal.ops.neighborhood_attention2d).parameters
    for c in dil:
        assert (G.unsupported_kwargs(c) is None) == has


def test_gpu_duration_estimate_within_targets():
    """The grid stays inside its GPU budget (3 min --quick, 10 min full, with a 10% margin on the
    quick target for the estimate's granularity): adding a line that breaks it fails here."""
    from dcal.check import grid as G

    quick, qc = G.estimate_gpu_seconds(True)
    full, fc = G.estimate_gpu_seconds(False)
    assert quick <= 1.1 * 180 and full <= 600, (quick, qc, full, fc)
    assert fc["runs"] > qc["runs"] > 0


def test_sanitizer_log_parsing():
    from dcal.check.cli import sanitizer_findings

    clean = (
        "========= ERROR SUMMARY: 0 errors\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 3 warnings)\n"
    )
    assert sanitizer_findings(clean)[1] == []
    bad = (
        "========= Invalid __global__ read of size 2 bytes\n=========     at _pwca_fwd_kernel+0x1a0\n"
        "========= ERROR SUMMARY: 1 error\n"
    )
    assert len(sanitizer_findings(bad)[1]) == 2
    race = "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
    assert sanitizer_findings(race)[1]


FAKE_SANITIZER = textwrap.dedent("""
    import subprocess, sys
    # stand-in for compute-sanitizer: [--tool T --error-exitcode N --print-limit M] command...
    tool, cmd = sys.argv[2], sys.argv[7:]
    rc = subprocess.call(cmd)
    if tool == "racecheck":
        print("========= Race reported between Write access at _kernel+0x10 and Read access at _kernel+0x20")
        print("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)")
    else:
        print("========= ERROR SUMMARY: 0 errors")
    sys.exit(rc)
""")


def test_sanitize_wraps_each_family_and_reads_the_tool(tmp_path):
    """--sanitize's mechanics with a stand-in tool (there is no GPU here): every family's worker
    runs under the tool, and the tool's summary decides the row."""
    import argparse
    import time

    from dcal.check import cli

    tool = tmp_path / "fake-sanitizer"
    tool.write_text(f"#!{sys.executable}\n" + FAKE_SANITIZER)
    tool.chmod(0o755)
    a = argparse.Namespace(
        device="cpu",
        quick=True,
        ops=["rollout"],
        only=["N33"],
        backends=["cpp"],
        dtypes=None,
        inject=None,
        tier=None,
        no_compile=False,
    )
    env = cli.child_env("cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env["PYTHONPATH"]
    rows = cli.sanitize(a, env, str(tmp_path), time.time() + 300, tool_path=str(tool))
    by = {r["check"]: r for r in rows}
    assert set(by) == {"sanitize:memcheck", "sanitize:racecheck"} and all(r["op"] == "rollout" for r in rows)
    assert by["sanitize:memcheck"]["status"] == "pass", by
    assert by["sanitize:racecheck"]["status"] == "fail" and "1 error" in by["sanitize:racecheck"]["detail"], by
    # the workers really ran (cpp on the TINY case, fp32 here) under the tool
    log = (tmp_path / "rollout.memcheck.jsonl").read_text()
    assert '"status": "pass"' in log and '"backend": "cpp"' in log


# ----------------------------------------------------------------------------- failing closed


def _check(args, tmp_path, timeout=600):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        DCAL_CHECK_COMPILE_BACKEND="aot_eager",
    )
    cmd = [
        sys.executable,
        "-m",
        "dcal.check",
        "--quick",
        "--device",
        "cpu",
        "--no-bench",
        "--out",
        str(tmp_path / "out"),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


@pytest.mark.parametrize(
    "args, names",
    [
        (
            ["--ops", "nonsense"],
            [
                "attention",
                "neighborhood",
                "rollout",
                "pwca_attention",
                "multi_kv_attention",
                "neighborhood_attention2d",
                "attention_rollout",
                "pwca (= pwca_attention)",
            ],
        ),
        (["--ops", "attention", "bogus"], ["--ops bogus", "attention_rollout"]),
        (["--dtypes", "float8"], ["float32", "float64", "bfloat16"]),
        (["--dtypes", "float16"], ["not checked on cpu", "float32, float64, bfloat16"]),  # a CUDA dtype
        (["--ops", "rollout", "--only", "no-such-case"], ["no case", "attention_rollout B1 H2 N33"]),
        (["--ops", "rollout", "--backends", "sdpa"], ["--backends sdpa", "attention_rollout: triton cpp"]),
    ],
)
def test_a_filter_that_selects_nothing_is_exit_2_in_one_line(args, names, tmp_path):
    res = _check(args, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m dcal.check: error: "), res.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "out").exists()  # nothing ran, no report


def test_pwca_is_an_alias_of_pwca_attention():
    from dcal.check import cli
    from dcal.check import grid as G

    a = cli.parse(["--device", "cpu", "--quick", "--ops", "pwca"])
    assert a.ops == ["pwca_attention"]
    cases = G.select("cpu", True, a.ops)
    assert cases and {c.op for c in cases} == {"pwca_attention"}
    # a family and an op of it together, the alias twice: each case once
    ops, why = G.resolve_filters("cpu", True, ["pwca", "pwca_attention", "rollout"])
    assert why is None and ops == ["pwca_attention", "rollout"]


def test_a_report_with_no_passing_case_is_never_passed():
    from dcal.check import report as REPORT

    def md(cases):
        return REPORT.markdown(
            dict(
                env={"device": "cpu"},
                run=dict(argv=[], device="cpu", wall_seconds=0, cpu_seconds=0),
                cases=cases,
                bench=[],
            )
        )

    def case(status):
        return dict(
            op="pwca_attention",
            backend="cpp",
            dtype="float32",
            shape="B1",
            check="out",
            status=status,
            max_err=None,
            tol=None,
            seconds=None,
            detail="",
            id="x",
        )

    for cases in ([], [case("skip")], [case("skip"), case("skip")]):
        head = md(cases).splitlines()[0]
        assert head == "# dcal.check: NOTHING CHECKED on cpu" and REPORT.verdict(cases) == REPORT.NOTHING
        assert "PASSED" not in md(cases)
    assert md([case("pass"), case("skip")]).splitlines()[0] == "# dcal.check: PASSED on cpu"
    assert md([case("pass"), case("error")]).splitlines()[0] == "# dcal.check: FAILED on cpu"


def test_a_run_where_every_case_skips_is_exit_2_and_not_passed(tmp_path):
    """Valid filters whose runs all skip (bf16 Triton: the CPU interpreter's bf16 dot is wrong)."""
    res = _check(["--ops", "rollout", "--only", "N33", "--backends", "triton", "--dtypes", "bfloat16"], tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "nothing was checked" in res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["cases"] and all(r["status"] == "skip" for r in report["cases"])
    assert (tmp_path / "out" / "report.md").read_text().startswith("# dcal.check: NOTHING CHECKED on cpu")
