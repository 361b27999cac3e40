# scalejepa: `make demo` trains a micro I-JEPA on embedded real images; `make test` runs the tests.
#
# The virtual environment reuses a torch that is already installed (GPU machines: install
# the CUDA build of torch first, see README). Otherwise it installs $(TORCH_SPEC), which on
# a CPU-only machine like CI's is the local CPU build; elsewhere pass an index for CPU wheels:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/demo-$(DEMO_STAMP)
PYTEST_ARGS ?=

.PHONY: demo test venv clean

$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && \
		$(BIN)/pip install -q --upgrade pip && \
		$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi

venv: $(BIN)/python

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[demo]"
	@touch $@

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

EVAL_DATA := --train-shards builtin:mnist5k:train --val-shards builtin:mnist5k:val --compare-random

demo: $(VENV)/.demo-installed
	$(BIN)/scalejepa-train --config small_cpu --run-dir $(RUN_DIR)
	@echo "== pretrained target encoder vs the same encoder at random init (MNIST digits, val split) =="
	$(BIN)/scalejepa-eval knn --weights $(RUN_DIR) $(EVAL_DATA) --k 20 --out $(RUN_DIR)/eval_knn.json
	$(BIN)/scalejepa-eval linear --weights $(RUN_DIR) $(EVAL_DATA) --out $(RUN_DIR)/eval_linear.json
	@echo "TensorBoard: $(BIN)/tensorboard --logdir $(RUN_DIR)/tb"

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
