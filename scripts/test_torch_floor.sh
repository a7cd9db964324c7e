#!/usr/bin/env bash
# Check pyproject's torch floor: the oldest torch/torchvision pair it allows, in its own venv,
# against the tests that touch version-dependent APIs (the elastic launcher and its signals,
# GradScaler, the out-of-memory error, checkpoints, torchvision transforms). Not part of .ci/run
# (a second torch install takes minutes); run it when the floor or those APIs change.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR_PINS="${FLOOR_PINS:-torch==2.3.1 torchvision==0.18.1}"
VENV="${VENV:-.venv-floor}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check $FLOOR_PINS
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[dev]' $FLOOR_PINS
"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit tests/integration/test_ddp.py \
  tests/integration/test_fast_path.py tests/integration/test_equivalence.py \
  tests/integration/test_stop_signals.py tests/integration/test_run_dir.py "$@"
