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
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info

# ---- The GPU image's versions on CPU (issue 23): torch 2.11.0 + Triton 3.6.0 -----------------
# A second virtual environment. PyPI's torch 2.11.0 is a CUDA build (530 MB wheel plus ~1.2 GB
# of nvidia-* wheels, 5.2 GB installed); it runs on CPU. NumPy < 2.4: Triton 3.6's interpreter
# fails with NumPy 2.4 (triton-lang/triton#9171, fixed in 3.7; see kernels/_common.py).
#   make test-compat           kernel, model, single-process and FSDP2 training, launch, export tests
#   make compile-check-compat  every kernel variant compiled by Triton 3.6 for sm_90a and sm_80
COMPAT_VENV ?= .venv-compat
# torchvision 0.26.0 is torch 2.11.0's (a CUDA build too): timm needs it, so the export tests
# load our timm directories in real timm here (the main venv's CPU torch 2.13 has no torchvision).
COMPAT_SPEC ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
COMPAT_TESTS ?= tests/test_kernels_attention.py tests/test_kernels_gather.py tests/test_kernels_compile_check.py \
	tests/test_model.py tests/test_train.py tests/test_distributed_fsdp.py tests/test_distributed_launch.py \
	tests/test_weights_out.py

.PHONY: test-compat compile-check-compat

$(COMPAT_VENV)/.compat-installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(COMPAT_SPEC) -e ".[demo,hub]" "pytest>=8"
	@touch $@

# The ViT-H compile test is left to compile-check-compat, which compiles a superset of it.
test-compat: $(COMPAT_VENV)/.compat-installed
	$(COMPAT_VENV)/bin/python -m pytest -q --durations=15 $(PYTEST_ARGS) $(COMPAT_TESTS) \
		--deselect tests/test_kernels_compile_check.py::test_vith_kernels_compile_for_sm90a

compile-check-compat: $(COMPAT_VENV)/.compat-installed
	env -u TRITON_INTERPRET $(COMPAT_VENV)/bin/python -m scalejepa.kernels.compile_check --target sm_90a,sm_80
