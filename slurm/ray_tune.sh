#!/bin/bash
# A Ray cluster on a SLURM allocation, then a sweep on it (tuning/sweep.py).
#
#   MLFLOW_TRACKING_URI=http://mlflow-host:5000 \
#       sbatch --nodes=4 slurm/ray_tune.sh --config configs/sweep_cifar10.yaml [key=value ...]
#
# Submit from the repository root. Ray's SLURM recipe: one task per node; `ray start --head`
# on the first node, `ray start --address` on the others (each an srun step in the
# background, `--block`), wait until every node has joined, run the sweep driver here (on the
# first node) with --address HEAD:PORT, then stop the steps by their PIDs (SLURM ends every
# process of a step). Each node offers its task's CPUs (--cpus-per-task) and GPUs to Ray;
# trials take `resources` of the sweep config each.
#
# The sweep dir (storage_path/name of the sweep config), the data and .venv must be on a file
# system every node sees: trials of one sweep run on any node and resume each other's
# checkpoints. Arguments after the script name go to tuning/sweep.py.
# Environment (all optional):
#   CONFIG               sweep config if no --config is given (default: configs/sweep_cifar10.yaml)
#   JOB_DIR              Ray's session files and logs (default: runs/ray-<job id>)
#   RAY_PORT             the head's GCS port (default: 6379 + job id % 1000)
#   RAY_AUTH_TOKEN       cluster token (token auth is always on; default: a fresh random
#                        token for this job, exported to every step, never written to disk)
# Exposure: on one node every Ray server listens on 127.0.0.1 only; with more, the head
# listens on its node's address (the others must reach it), behind the token.
#   MLFLOW_TRACKING_URI  an MLflow server for the sweep (several nodes write to it); unset: the
#                        training config's store (SQLite under the repository)
#   PYTHON, SPIKEPRUNE_DIR   as in slurm/imagenet.sh
# Preemption / time limit: USR1 (300 s before the limit, or scancel --signal=USR1 --batch ID)
# makes Tune stop gracefully and save the experiment; the job then requeues itself and the
# same command continues the sweep (finished trials are kept, the others resume).
#
#SBATCH --job-name=spikeprune-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
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

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit this script with sbatch"
[ -f tuning/sweep.py ] || die "$PWD is not the spikeprune repository: submit from its root or set SPIKEPRUNE_DIR"
PYTHON=${PYTHON:-.venv/bin/python}
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (create .venv with install.sh, or set PYTHON)"
RAY=$(dirname "$PYTHON")/ray
[ -x "$RAY" ] || die "$RAY not found (pip install 'ray[tune]==2.60.0' into the environment of PYTHON)"
args=("$@")
[[ " ${args[*]} " == *" --config "* || " ${args[*]} " == *" --config="* ]] || args=(--config "${CONFIG:-configs/sweep_cifar10.yaml}" "${args[@]}")

JOB_DIR=$(realpath -m "${JOB_DIR:-runs/ray-$SLURM_JOB_ID}")
mkdir -p "$JOB_DIR" || die "cannot create JOB_DIR=$JOB_DIR"
RAY_PORT=${RAY_PORT:-$(( 6379 + SLURM_JOB_ID % 1000 ))}
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')}
export PYTHONUNBUFFERED=1
# srun (22.05+) does not inherit --cpus-per-task from sbatch.
CPUS=${SLURM_CPUS_PER_TASK:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}

# Ray's session files: one folder per node. Ray puts unix sockets at
# <temp dir>/session_<date>_<pid>/sockets/... (at most 107 bytes), so a long JOB_DIR falls
# back to node-local /tmp.
RAY_TMP=$JOB_DIR/ray
if (( ${#RAY_TMP} > 32 )); then
    RAY_TMP=/tmp/ray-$SLURM_JOB_ID
    log "JOB_DIR is too long for Ray's socket paths: its session files go to $RAY_TMP on each node"
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
if (( ${#nodes[@]} == 1 )); then
    # One node: nobody outside it needs the cluster, so every Ray server listens on 127.0.0.1
    # only (Ray's "no cluster" switch, also read by the driver; docs/STACK.md).
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
    head_ip=127.0.0.1
else
    # The node's address as the other nodes reach it (DNS, else the NodeAddr slurmctld knows).
    head_ip=$("$PYTHON" -c "from launcher.distributed import resolve_host; print(resolve_host('$head_node'))") \
        || die "cannot resolve the address of $head_node"
fi
address=$head_ip:$RAY_PORT
log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: Ray head on $head_node ($address), ${#nodes[@]} node(s), $CPUS CPUs and $GPUS GPUs each"

step_pids=()
stop_cluster() {
    local pid
    for pid in "${step_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${step_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    step_pids=()
}
trap stop_cluster EXIT

srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" -w "$head_node" \
    "$RAY" start --head --block --node-ip-address="$head_ip" --port="$RAY_PORT" \
    --num-cpus="$CPUS" --num-gpus="$GPUS" --include-dashboard=false \
    --temp-dir="$RAY_TMP/head" &
step_pids+=($!)

# Wait for the head's GCS before the workers try to join it.
for _ in $(seq 120); do
    "$RAY" status --address "$address" >/dev/null 2>&1 && break
    kill -0 "${step_pids[0]}" 2>/dev/null || die "the Ray head step exited (see $JOB_DIR or slurm-*.err)"
    sleep 2
done
"$RAY" status --address "$address" >/dev/null 2>&1 || die "the Ray head at $address did not come up in 240 s"

for (( i = 1; i < ${#nodes[@]}; i++ )); do
    srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" -w "${nodes[$i]}" \
        "$RAY" start --address="$address" --block --num-cpus="$CPUS" --num-gpus="$GPUS" \
        --temp-dir="$RAY_TMP/worker$i" &
    step_pids+=($!)
done

alive=0
for _ in $(seq 120); do
    alive=$("$RAY" status --address "$address" 2>/dev/null | sed -n '/^Active:/,/^Pending:/p' | grep -c "node_")
    (( alive >= ${#nodes[@]} )) && break
    sleep 2
done
(( alive >= ${#nodes[@]} )) || die "only $alive of ${#nodes[@]} Ray nodes joined in 240 s"
log "Ray cluster up: $alive nodes"

if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
    log "MLFLOW_TRACKING_URI is not set: the sweep tracks into the training config's store (SQLite: use an MLflow server when trials run on several nodes)"
fi

# The driver waits in the background so the USR1 trap runs at once (bash runs traps only
# between foreground commands); Tune treats USR1 like Ctrl-C: stop, save the experiment.
"$PYTHON" tuning/sweep.py --address "$address" "${args[@]}" &
driver=$!
requeue=0
trap 'requeue=1; log "USR1: stopping the sweep (Tune saves its state)"; kill -USR1 "$driver" 2>/dev/null || true' USR1
rc=0
while :; do
    rc=0
    wait "$driver" || rc=$?
    kill -0 "$driver" 2>/dev/null || break
done
trap - USR1
stop_cluster
if (( requeue )); then
    log "requeueing job $SLURM_JOB_ID: the same command continues the sweep"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue?); resubmit to continue"
    exit 0
fi
log "sweep driver exited with $rc"
exit "$rc"
