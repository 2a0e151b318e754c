"""Ahead-of-time compilation of Triton kernels without a GPU (docs/design.md, how GPU code is proven, point 2).

Each kernel module declares the configurations its launchers can pick as plain
:class:`dcal.kernels._aot.KernelSpec`s (a function ``aot_specs()`` returning a list), which
:func:`all_specs` turns into :class:`AOTSpec`s. :func:`compile_spec` compiles one to a cubin for a
given architecture with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
runs ``ptxas -v`` on the PTX to read registers, spill bytes and shared memory.

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT objects
that the compiler needs); :func:`compile_in_subprocess` takes care of that for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

from dcal.kernels._aot import KernelSpec


@dataclass
class AOTSpec(KernelSpec):
    """A :class:`dcal.kernels._aot.KernelSpec` as the harness compiles it (same fields), plus the
    compiler attributes its alignment implies."""

    @classmethod
    def of(cls, spec: KernelSpec) -> "AOTSpec":
        if isinstance(spec, cls):
            return spec
        return cls(**{f.name: getattr(spec, f.name) for f in fields(KernelSpec)})

    def attrs(self) -> Dict[tuple, list]:
        names = list(self.signature)
        aligned = (
            self.aligned if self.aligned is not None else [n for n, t in self.signature.items() if t.startswith("*")]
        )
        return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def ptxas_path() -> str:
    """The ptxas that ships with triton (it matches the PTX triton emits)."""
    import os

    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        import shutil

        path = shutil.which("ptxas") or path
    return path


def ptxas_stats(ptx: str) -> Dict[str, int]:
    """Run ``ptxas -v`` on PTX text; return registers, spill bytes (stores + loads), stack and
    static shared memory of its (single) kernel."""
    import os
    import re
    import subprocess
    import tempfile

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas_path(), "-v", f"-arch={target}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {target}:\n{out.stderr}")
    log = out.stdout + out.stderr
    num = lambda pat: sum(int(x) for x in re.findall(pat, log))  # noqa: E731
    return {
        "regs": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "spill_bytes": num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "static_smem": num(r"(\d+) bytes smem"),
        "ptxas_log": log,
    }


def compile_spec(spec: AOTSpec, cc: int) -> Dict[str, object]:
    """Compile one configuration for compute capability ``cc`` (80, 90) to a cubin, no GPU needed.

    Returns registers, spill bytes, shared memory (Triton's dynamic shared memory, which is what
    tiles use) and the cubin size; raises whatever the compiler raises (that is the point: it
    catches what the interpreter accepts and the compiler refuses)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_spec needs a process without TRITON_INTERPRET=1 (use compile_in_subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = AOTSpec.of(spec)
    src = ASTSource(
        fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=spec.attrs()
    )
    k = triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )
    stats = ptxas_stats(k.asm["ptx"])
    shared = int(getattr(k.metadata, "shared", 0) or 0)
    return {
        "name": spec.name,
        "arch": f"sm_{cc}",
        "label": dict(spec.label),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "regs": stats["regs"],
        "spill_bytes": stats["spill_bytes"],
        "stack": stats["stack"],
        "shared": shared + stats["static_smem"],
        "cubin_bytes": len(k.asm["cubin"]),
    }


KERNEL_MODULES = ("dcal.kernels._probe", "dcal.kernels.pwca", "dcal.kernels.na2d", "dcal.kernels.rollout")


def all_specs(modules=KERNEL_MODULES) -> List[AOTSpec]:
    """Every AOTSpec declared by the kernel modules (modules not written yet are skipped)."""
    import importlib

    specs: List[AOTSpec] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        if hasattr(mod, "aot_specs"):
            specs.extend(AOTSpec.of(s) for s in mod.aot_specs())
    return specs


def compile_all(modules=KERNEL_MODULES, archs=(80, 90), name_filter: Optional[str] = None) -> List[Dict[str, object]]:
    """Compile every declared configuration for every arch; one result dict per (spec, arch)."""
    rows = []
    for spec in all_specs(modules):
        if name_filter and name_filter not in spec.name:
            continue
        for cc in archs:
            rows.append(compile_spec(spec, cc))
    return rows


def compile_in_subprocess(
    modules=KERNEL_MODULES, archs=(80, 90), name_filter: Optional[str] = None, timeout: float = 1800
) -> List[Dict[str, object]]:
    """:func:`compile_all` in a fresh Python process with TRITON_INTERPRET removed (for tests, which
    run with the interpreter on)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, sys; from dcal.testing.aot import compile_all; "
        f"rows = compile_all({tuple(modules)!r}, {tuple(archs)!r}, {name_filter!r}); "
        "sys.stdout.write('\\n@@AOT@@' + json.dumps(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.split("@@AOT@@", 1)[1])
