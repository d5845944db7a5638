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

.PHONY: venv demo test test-fast bench gpu-check lint check clean

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

# On a CUDA box: the GPU tests, then the GPU benchmark in bf16, in nf4 where
# bitsandbytes is installed, and sampling on vLLM where it is installed.
GPU_BENCH := $(BIN)/python bench/gpu_worker.py --batch 64 --steps 3 --warmup 1 \
	--sample-prompts 4 --sample-tokens 64
gpu-check: venv
	$(BIN)/python -m pytest -q -s -m gpu tests/gpu
	$(GPU_BENCH)
	if $(BIN)/python -c "import bitsandbytes" 2>/dev/null; then $(GPU_BENCH) --quantization nf4; \
	else echo "nf4: skipped, bitsandbytes is not installed (pip install -e '.[quant]')"; fi
	if $(BIN)/python -c "import vllm" 2>/dev/null; then $(GPU_BENCH) --sampler vllm; \
	else echo "vLLM sampling: skipped, vLLM is not installed (pip install -e '.[vllm]')"; fi

lint: venv
	$(BIN)/ruff check rewardsignal tests bench tools

# Architecture contracts (pyproject's [tool.importlinter]) and the type checker.
check: venv
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) signal-data signal-demo my-adapter
