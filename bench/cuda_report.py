"""Static report of the CUDA C++ neighborhood-attention kernels (``csrc/na2d_kernels.cuh``).

Every template instantiation the host code (``csrc/na2d_cuda.cu``) can launch is written into a
small generated ``.cu`` and compiled standalone with ``nvcc -cubin -arch=sm_XX -Xptxas -v`` for
each architecture (no GPU, no torch headers needed). ``ptxas -v`` gives registers, spill bytes
(stores + loads) and static shared memory per kernel; spills are defects.

    python -m bench.cuda_report [--arch 80 90]

:func:`rows` is what ``bench/kernel_report.py`` calls.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# What na2d_cuda.cu dispatches over (NA2D_DTYPE_SWITCH, NA2D_HEADDIM_SWITCH, NA2D_BOOL_SWITCH for
# the bias and for a unit head-dim stride).
DTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
HEAD_DIMS = (32, 64, 96, 128)
KERNELS = ("na2d_fwd_kernel", "na2d_bwd_dq_kernel", "na2d_bwd_dkdv_kernel")  # <T, D, HAS_RPB, UNIT_D>
BIAS_KERNELS = ("na2d_bwd_drpb_kernel",)  # <T, D, UNIT_D>, launched only with a bias
THREADS = 128  # na2d_cuda::kThreads


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def instantiations() -> List[str]:
    lines = []
    for ctype in DTYPES.values():
        for d in HEAD_DIMS:
            for unit in ("true", "false"):
                for k in KERNELS:
                    for rpb in ("true", "false"):
                        lines.append(
                            f"template __global__ void dcal::na2d_cuda::{k}<{ctype}, {d}, {rpb}, {unit}>"
                            f"(const dcal::na2d_cuda::Params<{ctype}>);"
                        )
                for k in BIAS_KERNELS:
                    lines.append(
                        f"template __global__ void dcal::na2d_cuda::{k}<{ctype}, {d}, {unit}>"
                        f"(const dcal::na2d_cuda::Params<{ctype}>);"
                    )
    return lines


def _demangle(names: Sequence[str], nvcc: str) -> Dict[str, str]:
    filt = os.path.join(os.path.dirname(nvcc), "cu++filt")
    if not os.path.exists(filt):
        filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")
_TEMPLATE = re.compile(r"(na2d_\w+_kernel)<([^,>]+), (\d+)(?:, (true|false))?, (true|false)>")


def parse_ptxas(text: str) -> List[dict]:
    """Per kernel entry: mangled name, arch, registers, spill bytes, static shared memory."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "regs": 0, "spill_bytes": 0, "shared": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(m.group(2))
            cur["shared"] = int(s.group(1)) if s else 0
    return rows


def compile_arch(arch: int, nvcc: str, workdir: str) -> List[dict]:
    src = os.path.join(workdir, "na2d_instances.cu")
    with open(src, "w") as f:
        f.write('#include "na2d_kernels.cuh"\n' + "\n".join(instantiations()) + "\n")
    cmd = [
        nvcc,
        "-cubin",
        f"-arch=sm_{arch}",
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-Xptxas",
        "-v",
        "-I",
        CSRC,
        "-o",
        os.path.join(workdir, f"na2d_sm{arch}.cubin"),
        src,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_{arch}:\n{res.stderr[-4000:]}")
    cubin = os.path.getsize(os.path.join(workdir, f"na2d_sm{arch}.cubin"))
    entries = parse_ptxas(res.stdout + res.stderr)
    names = _demangle([e["mangled"] for e in entries], nvcc)
    rows = []
    for e in entries:
        m = _TEMPLATE.search(names[e["mangled"]])
        if not m:
            continue
        kernel, ctype, d, rpb, unit = m.group(1), m.group(2).strip(), int(m.group(3)), m.group(4), m.group(5)
        dtype = next((k for k, v in DTYPES.items() if v == ctype), ctype)
        name = kernel.replace("_kernel", "")
        config = f"D<={d}" + ("" if rpb is None else f" rpb={rpb}") + f" unit_d={unit}"
        rows.append(
            {
                "name": name,
                "kernel": name,
                "arch": e["arch"],
                "dtype": dtype,
                "config": config,
                "label": {"dtype": dtype, "head_dim": d, **({} if rpb is None else {"rpb": rpb}), "unit_d": unit},
                "num_warps": THREADS // 32,
                "regs": e["regs"],
                "spill_bytes": e["spill_bytes"],
                "shared": e["shared"],
                "cubin_bytes": cubin,
            }
        )
    order = {k: i for i, k in enumerate(KERNELS + BIAS_KERNELS)}
    rows.sort(key=lambda r: (order.get(r["name"] + "_kernel", 99), r["dtype"], r["label"]["head_dim"], r["config"]))
    return rows


def rows(archs: Sequence[int] = (80, 90)) -> List[dict]:
    """Rows (kernel, arch, dtype, config, registers, spill bytes, shared memory) for every
    launchable instantiation; an empty list (with a message) when nvcc is missing."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("(CUDA C++ kernels: nvcc not found; set CUDA_HOME)")
        return []
    out: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="dcal_na2d_cubin_") as tmp:
        for arch in archs:
            out += compile_arch(int(arch), nvcc, tmp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    a = p.parse_args(argv)
    res = rows(a.arch)
    head = f"{'kernel':<18} {'arch':<6} {'dtype':<9} {'config':<30} {'regs':>5} {'spill B':>7} {'smem B':>7}"
    print(head)
    print("-" * len(head))
    for r in res:
        print(
            f"{r['kernel']:<18} {r['arch']:<6} {r['dtype']:<9} {r['config']:<30} {r['regs']:>5} "
            f"{r['spill_bytes']:>7} {r['shared']:>7}"
        )
    spills = [r for r in res if r["spill_bytes"]]
    print(f"\n{len(res)} kernel instantiations; {len(spills)} with spills")
    return 1 if spills or not res else 0


if __name__ == "__main__":
    sys.exit(main())
