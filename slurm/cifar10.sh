#!/bin/bash
# Single-node DeepSpeed training of the pruned 6Conv2FC SNN on CIFAR-10 (configs/cifar10.yaml).
#
#   CIFAR10_BETON_DIR=/shared/cifar10-beton MLFLOW_TRACKING_URI=http://mlflow-host:5000 \
#       sbatch slurm/cifar10.sh [key=value ...]
#
# Submit from the repository root. The #SBATCH lines are defaults the sbatch command line
# overrides; the paper's recipe is batch 16 on one GPU. N GPUs, one rank each:
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 slurm/cifar10.sh
# (data.batch_size is per rank: the global batch becomes 16 x N; GLOBAL_BATCH=16 splits it).
# Environment (all optional), as in slurm/imagenet.sh:
#   CIFAR10_BETON_DIR    folder with train/val/test.beton (default: the config's data.data_dir)
#   CONFIG               launcher config (default: configs/cifar10.yaml)
#   RUN_DIR              default runs/cifar10-<job id> (stable across requeue; reuse to resume)
#   MLFLOW_TRACKING_URI  MLflow server for rank 0; unset: ./mlruns.db
#   GLOBAL_BATCH         images per optimizer step over all ranks (default: empty, the
#                        config's per-rank data.batch_size)
#   PYTHON, EXTRA_ARGS, SPIKEPRUNE_DIR   as in slurm/imagenet.sh
# Preemption: USR1 (300 s before the time limit, or scancel --signal=USR1 --batch ID) ->
# checkpoint -> requeue -> resume (slurm/_common.sh). No GPUs: sbatch --gpus-per-node=0.
#
#SBATCH --job-name=spikeprune-cifar10
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.err

set -uo pipefail
cd "${SPIKEPRUNE_DIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 2
# shellcheck source=slurm/_common.sh
source slurm/_common.sh || { echo "error: run from the spikeprune repository root (or set SPIKEPRUNE_DIR)" >&2; exit 2; }

CONFIG=${CONFIG:-configs/cifar10.yaml}
RUN_DIR=${RUN_DIR:-runs/cifar10-${SLURM_JOB_ID:-}}
PYTHON=${PYTHON:-.venv/bin/python}
GLOBAL_BATCH=${GLOBAL_BATCH:-}

train_job "${CIFAR10_BETON_DIR:-}" CIFAR10_BETON_DIR "$@"
