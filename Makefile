# Shortcuts; scripts/setup.sh is what they (and CI) run.
.PHONY: setup train test lint clean
setup:
	bash scripts/setup.sh
train: setup
	.venv/bin/python train.py $(ARGS)
PYTEST_ARGS ?= -n 2
test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)
lint: setup
	.venv/bin/ruff check src tests benchmarks
clean:
	rm -rf .venv outputs multirun mlruns mlflow.db
