# Two commands on a fresh machine (see README):
#   make bench   set up (venv, torch, dcal built with its C++/CUDA extension) and run the main job:
#                the speed/memory comparison of bench/, bounded by a time budget per case (at most
#                15 minutes on a 2-core machine; BENCH_ARGS=--full for the long run)
#   make bench-report   the README's results table and bench/results/summary.md from that run
#   make test    the same set-up, then the test suite (2 pytest workers)
#   make check   the same set-up, then python -m dcal.check (run it first on a GPU; README)
# All only need python3 (3.10+), a C++ compiler and, for the CUDA part, nvcc on the PATH.

VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
# the libraries dcal drops into (timm, torchvision, open_clip), tested against the real packages
COMPAT  ?= torchvision==0.29.1 timm==1.0.31 safetensors open_clip_torch==3.3.0
# nvcc on the PATH may be a wrapper script, which misleads torch's guess of the toolkit root:
# ask nvcc itself (the TOP of --dryrun) unless CUDA_HOME is given.
CUDA_HOME ?= $(shell nvcc --dryrun -c dcal_probe.cu -o /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -1 | xargs -r realpath 2>/dev/null)
export CUDA_HOME
BENCH_ARGS ?=
TEST_ARGS  ?=
CHECK_ARGS ?= --quick
CHECK_OUT  ?= dcal-check

.PHONY: setup bench bench-report test check kernel-report clean

setup: $(VENV)/.dcal-installed

$(VENV)/.dcal-installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja
	$(PY) -m pip install -q $(COMPAT)
	@echo "CUDA_HOME=$(CUDA_HOME)"
	$(PY) -m pip install --no-build-isolation -v -e ".[dev,bench,data]" > $(VENV)/build.log 2>&1 || { tail -60 $(VENV)/build.log; exit 1; }
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

kernel-report: setup
	$(PY) -m bench.kernel_report

clean:
	rm -rf build *.egg-info dcal/_C*.so
