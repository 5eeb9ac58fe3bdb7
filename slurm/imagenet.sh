#!/bin/bash
# Multi-node DeepSpeed training of the pruned SEW-ResNet-18 on ImageNet
# (configs/imagenet_sew18.yaml: search, hard subnetwork, fine-tune, test + energy report).
#
#   IMAGENET_BETON_DIR=/shared/imagenet-beton MLFLOW_TRACKING_URI=http://mlflow-host:5000 \
#       sbatch slurm/imagenet.sh [key=value ...]
#
# Submit from the repository root. Every #SBATCH line below is a default that the sbatch
# command line overrides (sbatch --nodes=4 --time=12:00:00 slurm/imagenet.sh). One rank per
# GPU: keep --ntasks-per-node equal to --gpus-per-node. Environment (all optional):
#   IMAGENET_BETON_DIR   folder with train/val/test.beton (default: the config's data.data_dir)
#   CONFIG               launcher config (default: configs/imagenet_sew18.yaml)
#   RUN_DIR              checkpoints, reports, MLflow run id (default: runs/imagenet-<job id>;
#                        a requeued job keeps its id, so it resumes; resubmit with the same
#                        RUN_DIR to resume by hand)
#   MLFLOW_TRACKING_URI  MLflow server for rank 0 (http://host:5000); unset: ./mlruns.db
#   GLOBAL_BATCH         images per optimizer step over all ranks (default 256, the paper's):
#                        data.batch_size = GLOBAL_BATCH / tasks; set it empty to keep the
#                        config's per-GPU batch
#   PYTHON               interpreter (default: .venv/bin/python)
#   EXTRA_ARGS           more launcher overrides, "key=value key=value" (arguments after the
#                        script name are overrides too and come last)
#   SPIKEPRUNE_DIR       repository root (default: the folder sbatch was run from)
# Preemption: 300 s before the time limit (--signal) or on `scancel --signal=USR1 --batch ID`
# every rank checkpoints and the job requeues itself (slurm/_common.sh). Not a GPU cluster?
# `sbatch --gpus-per-node=0 ...` removes the GPU request (ranks then use gloo on CPU).
#
#SBATCH --job-name=spikeprune-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
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

CONFIG=${CONFIG:-configs/imagenet_sew18.yaml}
RUN_DIR=${RUN_DIR:-runs/imagenet-${SLURM_JOB_ID:-}}
PYTHON=${PYTHON:-.venv/bin/python}
GLOBAL_BATCH=${GLOBAL_BATCH-256}

train_job "${IMAGENET_BETON_DIR:-}" IMAGENET_BETON_DIR "$@"
