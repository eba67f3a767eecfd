# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, PyTorch (torch==2.13.0 unless a torch
# is already importable: never an unpinned download of the CUDA build on a CPU machine), Triton, the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-compare install clean

$(BIN)/python:
	$(PY) -m venv $(if $(shell $(PY) -c "import torch" 2>/dev/null && echo y),--system-site-packages,) $(VENV)

$(STAMP): $(BIN)/python setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install triton
	$(BIN)/pip install setuptools wheel ninja
	$(BIN)/pip install --no-build-isolation -e ".[test,apps]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m metricloss_kernels demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/pip install faiss-cpu pytorch-metric-learning matplotlib
	$(BIN)/python -m metricloss_kernels bench --out benchmarks/results/cpu

# The pytest-benchmark suite (benchmarks/): saves the run under .benchmarks/$(METRICLOSS_BENCH)/ and, from the second
# run on, fails when a case's median is more than 10% slower than in the previous run (docs/benchmarks.md).
# BENCH_ARGS: more pytest arguments, e.g. BENCH_ARGS="-k soft_triple".
METRICLOSS_BENCH ?= quick
BENCH_ARGS ?=
BENCH_STORAGE := .benchmarks/$(METRICLOSS_BENCH)
BENCH_COMPARE := $(if $(wildcard $(BENCH_STORAGE)/*/*.json),--benchmark-compare --benchmark-compare-fail=median:10%)
bench-compare: $(STAMP)
	METRICLOSS_BENCH=$(METRICLOSS_BENCH) $(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-autosave \
		--benchmark-storage=$(BENCH_STORAGE) $(BENCH_COMPARE) $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info metricloss_kernels/*.so $(VENV)
