#!/usr/bin/env bash
# Create .venv and install stepwise with its test tools. Needs only python3 (>= 3.10) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# torch and torchvision are a matched pair; pinning both keeps pip from choosing another torch.
TORCH_PINS="${TORCH_PINS:-torch==2.13.0 torchvision==0.28.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.stepwise-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check $TORCH_PINS
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev,optuna]'
  touch "$stamp"
fi
