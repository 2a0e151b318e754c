"""Packaging checks that run in seconds (the full round trip, wheel and sdist installed into fresh
venvs, is `make wheel-check` / .ci/wheel-check, run by CI): the wheel's package list covers every
package in the tree, the sdist holds every source file the build and the tests need, and
setup.py installs without the extension when there is no compiler, unless the extension is
required."""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tracked(*dirs):
    """Source files of the checkout under ``dirs`` (git's list when this is a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", *dirs], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if (ROOT / f).exists()]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    return [
        str(p.relative_to(ROOT))
        for d in dirs
        for p in (ROOT / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc")
    ]


def test_every_package_of_the_tree_is_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {
        "dcal." + ".".join(p.parent.relative_to(ROOT / "dcal").parts) if p.parent != ROOT / "dcal" else "dcal"
        for p in (ROOT / "dcal").rglob("__init__.py")
        if "kernels" not in p.parts
    }
    found |= {
        "dcal.kernels" + "".join("." + x for x in p.parent.relative_to(ROOT / "kernels").parts)
        for p in (ROOT / "kernels").rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["dcal.kernels"] == "kernels"


IGNORE = shutil.ignore_patterns(".venv", "build", "dist", "*.so", "*.o", "__pycache__", ".git", "runs", "*.egg-info")


def test_sdist_holds_every_source_file(tmp_path):
    # from a copy without *.egg-info: setuptools adds the files of an old SOURCES.txt to the sdist,
    # which would hide a file missing from MANIFEST.in
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    res = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (sdist,) = tmp_path.glob("dcal-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = _tracked("csrc", "dcal", "kernels", "tests", "configs") + ["setup.py", "pyproject.toml", "MANIFEST.in"]
    missing = sorted(f for f in want if f not in names)
    assert not missing, f"files missing from the sdist (MANIFEST.in): {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def _setup_build_ext(tmp_path, **env):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    e = {k: v for k, v in os.environ.items() if k not in ("DCAL_REQUIRE_EXTENSION", "DCAL_NO_EXTENSION")}
    e.update(DCAL_NO_CUDA="1", CC="false", CXX="false", **env)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=src,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    ), src


def test_no_compiler_installs_without_the_extension_and_says_so(tmp_path):
    res, src = _setup_build_ext(tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "installed WITHOUT its C++/CUDA extension" in res.stderr
    assert not list((src / "dcal").glob("_C*.so"))


def test_no_compiler_fails_when_the_extension_is_required(tmp_path):
    res, _ = _setup_build_ext(tmp_path, DCAL_REQUIRE_EXTENSION="1")
    assert res.returncode != 0
    assert "installed WITHOUT" not in res.stderr
