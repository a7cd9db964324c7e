# Two entry points on a fresh clone with only Python 3.11 and pip: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13 + torchvision 0.28 are a matched pair; pinning them keeps pip from pulling CUDA wheels.
TORCH_PINS ?= torch==2.13.0 torchvision==0.28.0

.PHONY: setup train test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun mlruns mlflow.db
