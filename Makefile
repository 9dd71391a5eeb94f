# hbmplan: `make help` lists the targets.
# Uses $(VENV) (created on first use with the CPU torch wheel) unless PY is given, e.g.
# `make test PY=python` inside an environment that already has torch (a GPU image).
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the CPU build of torch (PyPI's Linux wheel is the CUDA one, with GBs of CUDA libraries)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.hbmplan-installed
# CPUs this process may use (affinity and cgroup CPU limit, not the host's core count); the
# test suite runs one pytest-xdist worker per CPU, each with CPUS / workers torch threads
# (tests/conftest.py); loadgroup keeps tests that share a module fixture on one worker
CPUS = $$($(PY) tools/cpus.py)

.PHONY: help demo demo-dist test test-fast bench rag-eval lint setup

ifeq ($(PY),$(VENV)/bin/python)
SETUP := $(STAMP)
endif

help:  ## list the targets
	@echo "hbmplan make targets (PY=$(PY)):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20
	@echo "variables: PY=python (an environment that already has torch), VENV, TORCH_SPEC, TORCH_INDEX"

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --extra-index-url $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test,hf,triton,plot]" ruff
	touch $(STAMP)

setup: $(SETUP)  ## create .venv with the CPU torch wheel and hbmplan's extras (done on first use)

demo: $(SETUP)  ## reuse vs dense on a small model: gradient difference, speedup (median, spread), memory
	$(PY) tools/demo.py

demo-dist: $(SETUP)  ## a few GRPO steps on 2 ranks under FSDP2 (gloo on CPU, nccl on GPUs): tools/examples/fsdp_grpo.py
	$(PY) -m torch.distributed.run --standalone --nproc-per-node 2 tools/examples/fsdp_grpo.py

test: $(SETUP)  ## the CPU test suite, one pytest-xdist worker per usable CPU
	$(PY) -m pytest -q -n $(CPUS) --dist loadgroup

test-fast: $(SETUP)  ## the CPU test suite without the tests marked slow
	$(PY) -m pytest -q -n $(CPUS) --dist loadgroup -m "not slow"

bench: $(SETUP)  ## dense vs reuse over the benchmark grid (benchmarks/results/schedule_<card>_<date>.md)
	$(PY) tools/bench_schedule.py

rag-eval: $(SETUP)  ## the DH-RAG multi-turn prompt builder's evaluation (tools/rag_eval.py)
	$(PY) tools/rag_eval.py

lint: $(SETUP)  ## ruff check and ruff format --check
	$(PY) -m ruff check hbmplan tests tools
	$(PY) -m ruff format --check hbmplan tests tools
