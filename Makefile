# Two entry points, each working on a fresh machine from nothing:
#   make demo   set up .venv, then train the tiny GPT on the Python standard library
#   make test   set up .venv, then lint (ruff check, ruff format --check) and run the whole test suite
#
# torch is installed pinned (TORCH_VERSION) unless the venv already has a torch: users with
# GPUs create .venv and install their CUDA build of torch first, and this keeps it.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/loom train --config configs/demo.toml

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
