# Shared by slurm/imagenet.sh and slurm/cifar10.sh (sourced from the repository root, never
# run): builds the launcher's command line from the environment and runs it as one srun step
# that checkpoints and requeues the job on USR1.
# shellcheck shell=bash

EXIT_REQUEUE=75  # launcher.checkpoint.EXIT_REQUEUE: every rank saved after USR1 and stopped

log() { echo "[$(date '+%F %T')] $*"; }
die() { echo "[$(date '+%F %T')] error: $*" >&2; exit 2; }

# run_requeueable CMD...: run the srun step in the background and wait for it.
#
# USR1 reaches this shell from `--signal=B:USR1@N` (N seconds before the time limit) or from
# `scancel --signal=USR1 --batch JOBID` (preemption by hand). It is forwarded to srun, which
# forwards it to every task; each rank saves a checkpoint at its next optimizer step and exits
# with 75. Then this job requeues itself: same job id, so the same RUN_DIR, so the next start
# resumes from `latest` into the same MLflow run. (`scancel --signal=USR1 JOBID` signals the
# ranks directly: they exit 75 and the job requeues the same way.) TERM (scancel, time limit)
# is forwarded too: the ranks save and exit 143 and the job ends without a requeue.
# The step must run in the background: bash runs a trap only after the foreground command ends.
run_requeueable() {
    STEP_SIGNAL=""
    "$@" &
    STEP_PID=$!
    trap 'STEP_SIGNAL=USR1; log "USR1: asking the ranks to checkpoint and stop"; kill -USR1 "$STEP_PID" 2>/dev/null || true' USR1
    trap 'STEP_SIGNAL=${STEP_SIGNAL:-TERM}; log "TERM: asking the ranks to checkpoint and stop"; kill -TERM "$STEP_PID" 2>/dev/null || true' TERM
    local rc
    while :; do
        rc=0
        wait "$STEP_PID" || rc=$?
        # A trap cuts `wait` short (rc > 128) while the step still runs: keep waiting for it.
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    if (( rc == 0 )); then
        log "training finished"
        return 0
    fi
    if (( rc == EXIT_REQUEUE )) || [ "$STEP_SIGNAL" = USR1 ]; then
        log "step stopped with exit $rc after USR1: requeueing job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
        # SLURM ends this batch script at once and queues the job again.
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue?); resubmit with RUN_DIR=$RUN_DIR to resume"
        return 0
    fi
    log "step failed with exit $rc"
    return "$rc"
}

# train_job DATA_DIR DATA_VAR [key=value ...]: check the job, then srun one launcher per task.
# Reads CONFIG, RUN_DIR, PYTHON, GLOBAL_BATCH, EXTRA_ARGS and MLFLOW_TRACKING_URI (see the
# scripts' headers); arguments after the script name are launcher overrides too.
train_job() {
    local data_dir=$1 data_var=$2
    shift 2
    [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit this script with sbatch"
    [ -f launcher/train.py ] || die "$PWD is not the spikeprune repository: submit from its root or set SPIKEPRUNE_DIR"
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (create .venv with install.sh, or set PYTHON)"
    [ -f "$CONFIG" ] || die "CONFIG=$CONFIG not found"

    local args=(--config "$CONFIG" "checkpoint.run_dir=$RUN_DIR")
    if [ -n "$data_dir" ]; then
        [ -f "$data_dir/train.beton" ] || die "$data_var=$data_dir has no train.beton (slurm/README.md: writing the .beton files)"
        args+=("data.data_dir=$data_dir")
    fi
    local ranks=${SLURM_NTASKS:-1}
    if [ -n "${GLOBAL_BATCH:-}" ]; then
        [[ "$GLOBAL_BATCH" =~ ^[1-9][0-9]*$ ]] || die "GLOBAL_BATCH=$GLOBAL_BATCH is not a positive integer"
        (( GLOBAL_BATCH % ranks == 0 )) || die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of the $ranks tasks"
        args+=("data.batch_size=$(( GLOBAL_BATCH / ranks ))")
    fi
    local srun_args=()
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        # srun 22.05-23.02 does not inherit --cpus-per-task from sbatch; the CPUs feed FFCV's workers.
        srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
        args+=("data.num_workers=$SLURM_CPUS_PER_TASK")
    fi
    local extra=()
    read -r -a extra <<< "${EXTRA_ARGS:-}"
    args+=("${extra[@]}" "$@")

    # Rank variables from the submitting shell (a torchrun session, say) would override SLURM's.
    local v
    for v in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE; do
        if [ -n "${!v:-}" ]; then
            log "ignoring $v=${!v} from the submitting environment (ranks come from srun)"
            unset "$v"
        fi
    done
    if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
        log "MLFLOW_TRACKING_URI is not set: rank 0 tracks into sqlite:///$PWD/mlruns.db (use an MLflow server for several jobs)"
    fi
    export PYTHONUNBUFFERED=1
    log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $ranks tasks on ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-}"
    log "srun ${srun_args[*]} $PYTHON -m launcher.train ${args[*]}"
    run_requeueable srun "${srun_args[@]}" "$PYTHON" -m launcher.train "${args[@]}"
}
