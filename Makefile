# privreg: two commands do everything on a fresh machine.
#   make demo   - set up (.venv) and run the demo on bundled sample data
#   make test   - set up (.venv) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 CPU build first (this machine has it as a local wheel): never pull CUDA wheels
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/privreg demo -o out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_clear.py
	$(PY) benchmarks/bench_ppir.py

clean:
	rm -rf out .pytest_cache
