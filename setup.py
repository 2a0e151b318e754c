"""Build of the dcal torch extension (``dcal._C``).

C++ CPU kernels (``csrc/*.cpp``) are always built (OpenMP, -O3). CUDA kernels (``csrc/*.cu``)
are added when the installed torch is a CUDA build and ``nvcc`` is found.

Environment switches:
  DCAL_NO_EXTENSION=1   build no extension at all (pure Python + Triton)
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

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home_from_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "dcal_probe.cu", "-o", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def _extensions():
    if _flag("DCAL_NO_EXTENSION"):
        print("dcal: DCAL_NO_EXTENSION set, building no extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

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
        print(f"dcal: building CPU + CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']}): {cpp_sources + cu_sources}")
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
            "dcal._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
