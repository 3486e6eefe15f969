# kvlab quickstart: `make demo` (default experiment on CPU, results + plots), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/quickstart

.PHONY: setup demo test test-gpu clean

setup:
	@bash scripts/setup.sh

demo: setup
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/kvlab run -m allocator=paged,contiguous hydra.sweep.dir=$(DEMO_DIR)
	$(VENV)/bin/kvlab report $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf runs outputs multirun .pytest_cache
