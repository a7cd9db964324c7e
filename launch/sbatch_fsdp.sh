#!/usr/bin/env bash
# FSDP in one SLURM job over several nodes, one task per GPU: srun starts the tasks and stepwise
# reads SLURM_PROCID, SLURM_NTASKS and the node list (rendezvous on the first node, port
# 20000 + job id % 20000). Every rank writes its shards to checkpoints/step-N.dcp/ in the run
# directory: outputs/ must be on a file system all nodes share.
#   sbatch launch/sbatch_fsdp.sh accum=4 parallel.shard_modules=[Block] trainer.precision=bf16
#SBATCH --job-name=stepwise-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}
srun "$PYTHON" train.py parallel=fsdp parallel.nnodes="$SLURM_JOB_NUM_NODES" "$@"
