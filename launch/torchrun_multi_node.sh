#!/usr/bin/env bash
# Run this on EVERY node, with the same RDZV_ENDPOINT (host:port of one of them) and RDZV_ID:
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node01:29400 RDZV_ID=exp42 launch/torchrun_multi_node.sh accum=4
# PARALLEL=fsdp shards the model over all NNODES x NPROC ranks instead (default: ddp); every rank
# then writes its shards of each checkpoint to <run dir>/checkpoints/step-N.dcp/.
# Rank 0 (whichever node it lands on) owns the run directory, the MLflow run and the checkpoints;
# use a shared file system for outputs/ and an MLflow server (logger.tracking_uri=http://...)
# that every node can reach on the internal network, with basic auth: export
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD on every node from a file only you can read
# (docs/tracking.md, "A tracking server on a cluster"), not on the command line.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_ID=${RDZV_ID:-stepwise}
PARALLEL=${PARALLEL:-ddp}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" "$(dirname "$0")/../train.py" \
  parallel="$PARALLEL" parallel.nnodes="$NNODES" parallel.nproc="$NPROC" "$@"
