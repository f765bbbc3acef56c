# The two commands a newcomer needs:  make run   and   make test
# Both install what they need first. Flags for the training CLI: make run ARGS="--method lora --overwrite"
# On a machine without a GPU the CPU build of
# torch is installed before the package, so pip keeps it instead of fetching CUDA.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install install-test run test bench

install:
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PIP) install -q "$(TORCH_CPU)"; fi
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e ".[test]"

run: install
	$(PYTHON) -m clear_fast.train $(ARGS)

test: install-test
	$(PYTHON) -m pytest tests/ -q

bench: install-test
	$(PYTHON) -m pytest benchmarks/ --benchmark-only -q
