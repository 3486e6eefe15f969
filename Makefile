# kvlab quickstart: `make demo` (default experiment on CPU, results + plots), `make test`.
# Each target installs what it needs into $(VENV) first (scripts/setup.sh, a line per phase).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/quickstart

.PHONY: setup setup-base demo test test-gpu clean

setup:  # kvlab with the dev extra: tests, serving (and gpu on a machine with an NVIDIA GPU)
	@VENV=$(VENV) bash scripts/setup.sh dev

setup-base:  # kvlab alone (and gpu on a machine with an NVIDIA GPU): enough for the demo
	@VENV=$(VENV) bash scripts/setup.sh base

demo: setup-base
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/kvlab run -m allocator=paged,contiguous hydra.sweep.dir=$(DEMO_DIR)
	$(VENV)/bin/kvlab report $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf runs outputs multirun .pytest_cache
