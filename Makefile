# Two commands from a fresh machine (Python 3.11+ and make):
#   make demo   sets up .venv and runs the demo (digits, two teachers, a store, two students, a table)
#   make test   sets up .venv with the test extras and runs the test suite (what .ci/run calls)
# Each setup step runs once; it runs again when pyproject.toml changes. `make clean-venv` starts over.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
PYTEST_ARGS ?= -q
# Without a GPU, PyTorch's CPU-only wheels (about 1.5 GB installed; PyPI's default wheels bring the CUDA
# libraries, 6.3 GB). torch and torchvision come from the same index: PyPI's torchvision beside a CPU torch
# fails at import. Set TORCH_INDEX= (empty) to take the default index anyway.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?= $(if $(HAS_GPU),,$(TORCH_CPU_INDEX))

.PHONY: demo test setup setup-dev clean-venv

demo: $(VENV)/.setup
	$(BIN)/reinforce demo --workdir $(DEMO_DIR)

test: $(VENV)/.setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from the index chosen above, unless the environment already has a working pair. One retry:
# where that index cannot be reached, pip's local or configured sources still serve, without five back-offs per
# dependency. If the pair it got does not import together (a CPU torch beside another build's torchvision:
# "operator torchvision::nms does not exist"), both are reinstalled from the default index.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torchvision" 2>/dev/null || { \
		$(BIN)/pip install torch torchvision $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --retries 1); \
		$(BIN)/python -c "import torchvision" 2>/dev/null || \
		$(BIN)/pip install --force-reinstall torch torchvision; }
	$(BIN)/python -c "import torchvision"
	touch $@

$(VENV)/.setup: $(VENV)/.torch pyproject.toml loaders/pyproject.toml
	$(BIN)/pip install -e ./loaders -e .
	touch $@

$(VENV)/.setup-dev: $(VENV)/.torch pyproject.toml loaders/pyproject.toml
	$(BIN)/pip install -e ./loaders -e ".[dev]"
	touch $@

clean-venv:
	rm -rf $(VENV)
