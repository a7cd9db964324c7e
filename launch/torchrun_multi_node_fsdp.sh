#!/usr/bin/env bash
# FSDP over several nodes: run this on EVERY node, with the same RDZV_ENDPOINT (host:port of one
# of them) and RDZV_ID:
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node01:29400 RDZV_ID=exp42 launch/torchrun_multi_node_fsdp.sh accum=4
# The model, its gradients and optimizer state are sharded over all NNODES x NPROC ranks; rank 0
# (whichever node it lands on) owns the run directory, the MLflow run and checkpoints/last.pt, and
# every rank writes its shards to checkpoints/step-N.dcp/: use a shared file system for outputs/
# and an MLflow server (logger.tracking_uri=http://...) that every node can reach.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_ID=${RDZV_ID:-stepwise}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" "$(dirname "$0")/../train.py" \
  parallel=fsdp parallel.nnodes="$NNODES" parallel.nproc="$NPROC" "$@"
