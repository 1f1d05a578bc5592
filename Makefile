# Every target creates the virtual environment and installs the pinned dependencies when they
# are missing, so that on a fresh clone `make demo` and `make test` are each one command.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS := 1

.PHONY: demo test test-fast lint format bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/grokking.py

# pytest-randomly shuffles the test order on every run and prints its seed; rerun one order
# with `make test PYTEST_ARGS=--randomly-seed=SEED`.
PYTEST_ARGS ?=

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/first_contact.py
	$(PY) benchmarks/replay.py
	$(PY) benchmarks/cost.py
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/vs_devinterp.py
	$(PY) benchmarks/restrictions.py
	$(PY) benchmarks/preflight.py
	$(PY) benchmarks/curvature.py
	$(PY) benchmarks/observables.py
	$(PY) benchmarks/curves.py
