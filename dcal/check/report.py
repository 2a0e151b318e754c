"""``report.json`` (everything) and ``report.md`` (the tables a person reads) of ``python -m dcal.check``."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List

from dcal.testing import judging as J

STATUSES = ("pass", "fail", "error", "skip")
PASSED, FAILED, NOTHING = "PASSED", "FAILED", "NOTHING CHECKED"


def verdict(cases: List[dict]) -> str:
    """FAILED when any case failed or errored; PASSED only when at least one case passed and
    none failed; NOTHING CHECKED when no case ran (none selected, or all skipped)."""
    if any(r["status"] in ("fail", "error") for r in cases):
        return FAILED
    return PASSED if any(r["status"] == "pass" for r in cases) else NOTHING


def count(rows: List[dict]) -> str:
    c = Counter(r["status"] for r in rows)
    return ", ".join(f"{c.get(s, 0)} {s}" for s in STATUSES)


def _f(x, fmt="{:.3g}"):
    return "" if x is None else fmt.format(x)


def _cell(s) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def _case_rows(rows):
    return [
        [
            r["status"].upper() if r["status"] in ("fail", "error") else r["status"],
            r["op"],
            r["backend"],
            r["dtype"],
            r["shape"],
            r["check"],
            _f(r["max_err"]),
            _f(r["tol"]),
            _f(r["seconds"], "{:.2f}"),
            (r.get("detail") or "")[:220],
        ]
        for r in rows
    ]


CASE_HEADER = ["status", "op", "backend", "dtype", "shape", "check", "max err", "tol", "s", "detail"]


def markdown(data: Dict) -> str:
    env, run, cases, bench = data["env"], data["run"], data["cases"], data["bench"]
    bad = [r for r in cases if r["status"] in ("fail", "error")]
    L = [f"# dcal.check: {verdict(cases)} on {env.get('gpu') or env.get('device', run['device'])}", ""]
    if verdict(cases) == NOTHING:
        L += [
            "**No case passed or failed: every selected run was skipped, or the filters selected none. "
            "This run proves nothing.**",
            "",
        ]
    L.append(
        f"Cases: {count(cases)}. Wall {run['wall_seconds']} s, CPU (all subprocesses) {run['cpu_seconds']} s. "
        f"Command: `python -m dcal.check {' '.join(run['argv'])}`."
    )
    if env.get("injected"):
        L += [
            "",
            f"**A test hook was active (`--inject {env['injected']}`): this report checks the checker, "
            "not the kernels.**",
        ]
    L += [
        "",
        "Judging rule: `max|kernel - fp64 truth| <= factor * max|reference in the case's dtype - truth| + atol + "
        f"rtol * max|truth|`, factor {J.FWD_FACTOR:g} (forward, lse) / {J.GRAD_FACTOR:g} (gradients); (atol, rtol): "
        + ", ".join(f"{d} ({f.atol:g}, {f.rtol:g})" for d, f in J.FLOORS.items())
        + " (dcal.testing.judging). Outputs are NaN-filled before each call. "
        "`determinism`: two runs bit-identical where the backend promises it. `compile`: "
        "torch.compile(fullgraph=True), second call without recompiling.",
        "",
    ]
    L += ["## Environment", ""]
    keys = [
        "torch",
        "torch_cuda",
        "triton",
        "driver",
        "gpu",
        "capability",
        "gpu_memory_gib",
        "python",
        "platform",
        "cpu_count",
        "loadavg",
        "dcal",
        "dcal_commit",
        "TRITON_INTERPRET",
        "DCAL_BACKEND",
        "natten",
        "compute_sanitizer",
    ]
    L += _table(["what", "value"], [[k, env.get(k)] for k in keys if k in env])
    ext = env.get("extension", {})
    if ext:
        L += [
            "",
            f"`dcal._C`: loaded {ext.get('loaded')}, CUDA kernels compiled in: {ext.get('built_with_cuda')}"
            + (f", error: {ext.get('error')}" if ext.get("error") else "")
            + ".",
            "",
        ]
        L += _table(["dcal:: op", "kernels for"], [[k, ", ".join(v)] for k, v in ext.get("ops", {}).items()])
    if env.get("chains"):
        L += ["", "Backend chains (`dcal.ops.explain`):", "", "```"]
        for text in env["chains"].values():
            L.append(text)
        L += ["```"]
    if "error" in env:
        L += ["", f"Environment probe: {env['error']}"]
    if bad:
        L += ["", "## Failures and errors", ""] + _table(CASE_HEADER, _case_rows(bad))
    L += ["", "## Correctness grid", ""]
    by = Counter((r["op"], r["backend"], r["status"]) for r in cases)
    combos = sorted({(r["op"], r["backend"]) for r in cases})
    L += _table(
        ["op", "backend"] + list(STATUSES), [[o, b] + [by.get((o, b, s), 0) for s in STATUSES] for o, b in combos]
    )
    L += [""] + _table(CASE_HEADER, _case_rows(cases))
    if bench:
        L += [
            "",
            "## Benchmarks",
            "",
            "Median of interleaved rounds; peak = `max_memory_allocated` above the allocation before the call "
            "(CUDA only); share = TFLOP/s over the `torch.matmul` peak of the same dtype measured in this run.",
            "",
        ]
        L += _table(
            ["case", "provider", "status", "ms", "peak MiB", "TFLOP/s", "share of matmul peak", "detail"],
            [
                [
                    r["case"],
                    r["provider"],
                    r["status"],
                    _f(r["ms"], "{:.3f}"),
                    _f(r["peak_mib"], "{:.1f}"),
                    _f(r["tflops"], "{:.3g}"),
                    _f(r.get("share"), "{:.1%}"),
                    (r.get("detail") or "")[:200],
                ]
                for r in bench
            ],
        )
    est = run.get("gpu_estimate", {})
    if est:
        L += ["", "## Expected duration on one H100-class GPU (from the case count, see dcal/check/grid.py)", ""]
        L += _table(
            [
                "run",
                "grid cases",
                "runs (case x backend x dtype)",
                "Triton specialisations",
                "compile checks",
                "estimate",
            ],
            [
                [
                    k,
                    v["cases"],
                    v["runs"],
                    v["triton_specialisations"],
                    v["compile_checks"],
                    f"{v['seconds'] / 60:.1f} min",
                ]
                for k, v in est.items()
            ],
        )
    return "\n".join(L) + "\n"


def write(out_dir: str, data: Dict) -> None:
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(data))
