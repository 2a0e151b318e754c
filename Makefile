# Two commands on a fresh machine (see README):
#   make bench   set up (venv, torch, dcal built with its C++/CUDA extension) and run the main job:
#                the speed/memory comparison of bench/, bounded by a time budget per case (at most
#                15 minutes on a 2-core machine; BENCH_ARGS=--full for the long run)
#   make bench-report   the results table (docs/results.md), bench/results/summary.md and the plots
#                from that run's CSVs (kept in the repository)
#   make test    the same set-up, then the test suite (2 pytest workers)
#   make check   the same set-up, then python -m dcal.check (run it first on a GPU; README)
#   make docs    the documentation site into site/ (mkdocs build --strict; installs the docs extra)
# All only need python3 (3.10+), a C++ compiler and, for the CUDA part, nvcc on the PATH.

VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
# the libraries dcal drops into (timm, torchvision, open_clip, transformers), tested against the real packages
COMPAT  ?= torchvision==0.29.1 timm==1.0.31 safetensors open_clip_torch==3.3.0 transformers==5.24.0
# nvcc on the PATH may be a wrapper script, which misleads torch's guess of the toolkit root:
# ask nvcc itself (the TOP of --dryrun) unless CUDA_HOME is given.
CUDA_HOME ?= $(shell nvcc --dryrun -c dcal_probe.cu -o /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -1 | xargs -r realpath 2>/dev/null)
export CUDA_HOME
BENCH_ARGS ?=
TEST_ARGS  ?=
CHECK_ARGS ?= --quick
CHECK_OUT  ?= dcal-check
EXTRAS     ?= dev,bench,data

.PHONY: setup bench bench-report test check kernel-report docs wheel-check lint clean

setup: $(VENV)/.dcal-installed

$(VENV)/.dcal-installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "setuptools>=77" wheel ninja
	$(PY) -m pip install -q $(COMPAT)
	@echo "CUDA_HOME=$(CUDA_HOME)"
	DCAL_REQUIRE_EXTENSION=1 $(PY) -m pip install --no-build-isolation -v -e ".[$(EXTRAS)]" > $(VENV)/build.log 2>&1 || { tail -60 $(VENV)/build.log; exit 1; }
	$(PY) -m pip install -q --no-build-isolation --no-deps "natten==0.21.7"
	@grep -E "^ *dcal: building" $(VENV)/build.log || true
	$(PY) -c "import dcal, dcal._ext as e; assert e.HAS_EXTENSION, e.EXTENSION_ERROR; print('dcal._C loaded; CUDA kernels compiled in:', e.built_with_cuda())"
	touch $@

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

bench-report:
	$(PY) -m bench.report

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 $(TEST_ARGS) tests

# Every backend on this machine's device vs the fp64 reference, plus benchmarks: $(CHECK_OUT)/report.md.
# CHECK_ARGS= (empty) for the full run; add --sanitize for compute-sanitizer, --no-bench for correctness only.
check: setup
	$(PY) -m dcal.check $(CHECK_ARGS) --out $(CHECK_OUT)

# A broken link, a missing page or an API reference that does not resolve fails the build.
docs: setup
	$(PY) -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || \
		$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS),docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

kernel-report: setup
	$(PY) -m bench.kernel_report

# sdist + wheel (CPU part of the extension), each installed into a fresh venv outside the checkout
# and used there; see .ci/wheel-check (WHEEL_CHECK_ARGS: the dcal.check arguments run there).
wheel-check: setup
	PY=$(PY) .ci/wheel-check

# pyflakes and pycodestyle's error classes over the whole tree ([tool.ruff] in pyproject.toml)
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh

clean:
	rm -rf build dist *.egg-info dcal/_C*.so site
