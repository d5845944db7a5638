# One command sets everything up and runs the demo; one runs the tests.
# TORCH picks the torch version installed into the venv (skipped when the venv
# already has torch) and TORCH_INDEX where it comes from. PyPI's Linux wheel is the
# CUDA build (it runs on CPU too, with ~3 GB of CUDA libraries); for a CPU-only
# box: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`; for a given
# CUDA: TORCH_INDEX=https://download.pytorch.org/whl/cu128.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast bench lint check clean

$(BIN)/.installed: pyproject.toml requirements/cookbook.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hub,tensorboard,wandb]"
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
	rm -rf $(VENV) signal-data signal-demo my-adapter
