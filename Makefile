# make demo | make test | make bench | make rag-eval | make lint
# Uses $(VENV) (created on first use with the CPU torch wheel) unless PY is given, e.g.
# `make test PY=python` inside an environment that already has torch (a GPU image).
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.hbmplan-installed

.PHONY: demo test bench rag-eval lint setup

ifeq ($(PY),$(VENV)/bin/python)
SETUP := $(STAMP)
endif

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test,hf,triton,plot]" ruff
	touch $(STAMP)

setup: $(SETUP)

demo: $(SETUP)
	$(PY) tools/demo.py

test: $(SETUP)
	$(PY) -m pytest -q

bench: $(SETUP)
	$(PY) tools/bench_schedule.py

rag-eval: $(SETUP)
	$(PY) tools/rag_eval.py

lint: $(SETUP)
	$(PY) -m ruff check hbmplan tests tools
	$(PY) -m ruff format --check hbmplan tests tools
