"""Build of the dcal torch extension (``dcal._C``).

C++ CPU kernels (``csrc/*.cpp``) are always built (OpenMP, -O3). CUDA kernels (``csrc/*.cu``)
are added when the installed torch is a CUDA build and ``nvcc`` is found.

When the extension cannot be built (no C++ compiler, torch not importable at build time as in
pip's default isolated build, a compile error), the package still installs without it, with a
warning in the build log: ``dcal.ops.HAS_EXTENSION`` is then False, the "cpp" backend is skipped
(``dcal.ops.explain`` says why) and the reference, sdpa and Triton backends run.
``DCAL_REQUIRE_EXTENSION=1`` (set by the Makefile and CI) turns that into a build error.

Environment switches:
  DCAL_NO_EXTENSION=1   build no extension at all (pure Python + Triton)
  DCAL_REQUIRE_EXTENSION=1  fail the build when the extension cannot be built
  DCAL_NO_CUDA=1        build only the C++ CPU part
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0")
  CUDA_HOME             toolkit root; guessed from ``nvcc --dryrun`` when unset, because a
                        wrapper script named nvcc on the PATH misleads torch's own guess.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXTENSION_NOTE = (
    "dcal is installed WITHOUT its C++/CUDA extension: the 'cpp' backend is unavailable, the "
    "reference, sdpa and Triton backends work (dcal.ops.explain lists the chain). To build it: a C++ "
    "compiler and torch importable at build time, `pip install --no-build-isolation .`"
)


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _compiling() -> bool:
    """Whether this setup.py run builds binaries (an sdist or the metadata need no extension)."""
    return any(a in sys.argv for a in ("build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"))


def _skip_extension(why):
    """No extension: an error under DCAL_REQUIRE_EXTENSION, else a loud warning."""
    if not _compiling():
        return
    if _flag("DCAL_REQUIRE_EXTENSION"):
        raise SystemExit(f"dcal: DCAL_REQUIRE_EXTENSION is set and the extension cannot be built: {why}")
    bar = "!" * 78
    print(f"{bar}\ndcal: WARNING: {why}\n{NO_EXTENSION_NOTE}\n{bar}", file=sys.stderr)


def _cuda_home_from_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "dcal_probe.cu", "-o", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def _extensions():
    if _flag("DCAL_NO_EXTENSION"):
        print("dcal: DCAL_NO_EXTENSION set, building no extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _skip_extension(
            f"torch is not importable at build time ({e}); pip's isolated build does not see "
            "the installed torch: use `pip install --no-build-isolation`"
        )
        return [], {}

    if not os.environ.get("CUDA_HOME"):
        home = _cuda_home_from_nvcc()
        if home:
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = (
        not _flag("DCAL_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cu_sources)
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    # --threads 2: the two architectures compile in parallel
    nvcc = ["-O3", "-std=c++20", "-Xptxas", "-v", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "2"]
    define_macros = []
    if with_cuda:
        print(
            f"dcal: building CPU + CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']}): {cpp_sources + cu_sources}"
        )
        ext = cpp_extension.CUDAExtension(
            "dcal._C",
            cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx + ["-DDCAL_WITH_CUDA"], "nvcc": nvcc + ["-DDCAL_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    else:
        print(f"dcal: building CPU kernels only: {cpp_sources}")
        ext = cpp_extension.CppExtension(
            "dcal._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """torch's BuildExtension; a failed compile or link leaves the package without the
        extension (warning) unless DCAL_REQUIRE_EXTENSION is set."""

        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as e:  # noqa: BLE001  (compiler missing, compile/link error)
                if _flag("DCAL_REQUIRE_EXTENSION"):
                    raise
                _skip_extension(f"building dcal._C failed ({type(e).__name__}: {str(e).strip()[-400:]})")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
