#!/usr/bin/env bash
# One SLURM job, one task per rank: srun starts the tasks and stepwise reads SLURM_PROCID,
# SLURM_NTASKS and the node list (rendezvous on the first node, port 20000 + job id % 20000).
#   sbatch launch/sbatch_ddp.sh accum=4 trainer.max_epochs=20
#SBATCH --job-name=stepwise
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}
# An MLflow server with basic auth (docs/tracking.md, "A tracking server on a cluster"): the credentials
# come from a file only you can read, never from the command line, where ps and SLURM's
# accounting show them. srun passes the environment on to every task.
creds=${STEPWISE_MLFLOW_ENV:-$HOME/.config/stepwise/mlflow.env}
if [ -f "$creds" ]; then source "$creds"; fi
srun "$PYTHON" train.py parallel=ddp parallel.nnodes="$SLURM_JOB_NUM_NODES" "$@"
