# One command sets everything up and runs the demo; one runs the tests.
# TORCH picks the torch build installed into the venv: the default is the CPU
# build these tests run on; on a GPU box use e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast bench lint check clean

$(BIN)/.installed: pyproject.toml requirements/cookbook.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps tinker-cookbook==0.6.1
	$(BIN)/python -m pip install -q -r requirements/cookbook.txt
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/signal demo

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python bench/step_overhead.py

lint: venv
	$(BIN)/ruff check rewardsignal tests bench tools

# Architecture contracts (pyproject's [tool.importlinter]) and the type checker.
check: venv
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) signal-data my-adapter
