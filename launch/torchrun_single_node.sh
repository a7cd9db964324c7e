#!/usr/bin/env bash
# One node, NPROC processes (default: one per GPU, else 2), started by torchrun.
#   launch/torchrun_single_node.sh [hydra overrides...]
# Same training as `python train.py parallel=ddp ...`, which spawns the workers itself.
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec torchrun --standalone --nproc_per_node="$NPROC" "$(dirname "$0")/../train.py" \
  parallel=ddp "$@"
