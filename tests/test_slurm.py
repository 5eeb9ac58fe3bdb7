"""slurm/*.sh submitted to a real SLURM (slurmctld + two slurmd on 127.0.0.1, tests/slurm_cluster.py).

The scripts run unchanged; only sbatch options and environment variables make them fit this
CPU machine: `--gpus-per-node=0`, one CPU per task, a tiny model and a few steps. Checked:
a job completes with its MLflow run and energy report; USR1 makes a running job checkpoint,
requeue itself and finish from that step in the same MLflow run; two nodes train one
DeepSpeed (ZeRO-1, gloo) run on ImageNet-layout .beton files and end with identical weights.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_train import new_store
from slurm_cluster import REPO, SlurmCluster, slurm_missing

pytestmark = pytest.mark.slow

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
# sbatch options every test adds: no GPU request, the 1-CPU nodes of the test cluster.
CPU_OPTIONS = ("--gpus-per-node=0", "--cpus-per-task=1")
TINY = "model.width=0.0625 model.T=2 pruning.search_epochs=1 pruning.finetune_epochs=1 eval_batches_limit=1"


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(nodes=2) as c:
        yield c


def submit(cluster: SlurmCluster, script: str, tmp_path: Path, *options: str, **env: str) -> int:
    return cluster.sbatch(REPO / "slurm" / script, *CPU_OPTIONS, f"--output={tmp_path}/%x-%j.out",
                          f"--error={tmp_path}/%x-%j.err", *options, cwd=REPO,
                          env={"PYTHON": PYTHON, **env})


def job_log(tmp_path: Path, job_id: int) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job_id}.*")))


def finished(cluster: SlurmCluster, job_id: int, tmp_path: Path, timeout: float) -> dict:
    """Wait for COMPLETED; on any other end, fail with the job's log and the daemons' logs."""
    try:
        return cluster.wait_for(job_id, {"COMPLETED"}, timeout)
    except Exception as exc:
        pytest.fail(f"{exc}\n--- job log\n{job_log(tmp_path, job_id)[-6000:]}\n--- daemons\n{cluster.logs()}")


def mlflow_runs(tracking_uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {tracking_uri}"
    return client.search_runs([exp.experiment_id])


def artifacts(tracking_uri: str, run_id: str) -> set[str]:
    import mlflow

    return {f.path for f in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id)}


# --------------------------------------------------------------------------- single node

def test_usr1_checkpoints_requeues_and_resumes_into_the_same_mlflow_run(cluster, tmp_path):
    """slurm/cifar10.sh on one node: a tiny demo job, preempted by USR1 mid-run, requeued,
    resumed and finished into the same MLflow run with its energy report."""
    uri = new_store(tmp_path / "mlruns.db")
    run_dir = tmp_path / "run"
    steps_per_epoch = 10
    job = submit(cluster, "cifar10.sh", tmp_path, CONFIG="configs/demo.yaml", RUN_DIR=str(run_dir),
                 MLFLOW_TRACKING_URI=uri,
                 EXTRA_ARGS=f"{TINY} steps_per_epoch_limit={steps_per_epoch} data.batch_size=16 "
                            "checkpoint.every_steps=2")
    # The first checkpoint means the ranks are in the training loop with their handlers set.
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("step*")):
        assert time.monotonic() < deadline, f"no checkpoint yet\n{job_log(tmp_path, job)[-4000:]}"
        assert cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, job_log(tmp_path, job)[-4000:]
        time.sleep(0.5)
    # What a scheduler does before preemption: USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    # Requeued jobs wait cred_expire (120 s) before they may start again: start it now.
    deadline = time.monotonic() + 120
    while True:
        info = cluster.job(job)
        if info["JobState"] == "PENDING" and info["Restarts"] == "1":
            break
        assert info["JobState"] in {"RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "PENDING"}, \
            f"{info}\n{job_log(tmp_path, job)[-4000:]}"
        assert time.monotonic() < deadline, f"not requeued: {info}\n{job_log(tmp_path, job)[-4000:]}"
        time.sleep(0.5)
    # slurmd revoked the old run's credential at second resolution: a start within the same
    # second fails the job ("Job credential revoked"), so let the clock move on first.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = finished(cluster, job, tmp_path, timeout=300)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"

    log = job_log(tmp_path, job)
    assert "USR1: asking the ranks to checkpoint and stop" in log
    assert f"step stopped with exit 75 after USR1: requeueing job {job}" in log
    assert "restart 1:" in log
    assert "training finished" in log and "world_size=1" in log
    assert (run_dir / "energy_report.json").exists()
    resumed = re.findall(r"resuming from \S+ \(step (\d+), (?:search|finetune) epoch 1\)", log)
    total_steps = 2 * steps_per_epoch
    assert len(resumed) == 1 and 0 < int(resumed[0]) < total_steps, log[-4000:]

    (run,) = mlflow_runs(uri, "spikeprune-demo")  # one run, continued after the requeue
    assert run.info.status == "FINISHED"
    assert "energy_report.json" in artifacts(uri, run.info.run_id)
    assert run.data.params["data.num_workers"] == "1"  # from --cpus-per-task
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, total_steps + 1))


# --------------------------------------------------------------------------- two nodes

def make_imagenet_tree(root: Path, jpegs: list[tuple[bytes, int]]) -> Path:
    """ImageFolder layout: train/<wnid>/ with all 20 real photos, val/<wnid>/ with 8."""
    for split, count in (("train", 20), ("val", 8)):
        for i, (data, label) in enumerate(jpegs[:count]):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:02d}.JPEG").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def imagenet_beton(tmp_path_factory, imagenet_jpegs) -> tuple[Path, int]:
    """ImageNet-layout .beton files (train 16, val 4, test 8) and the class count."""
    import json

    root = tmp_path_factory.mktemp("imagenet")
    src = make_imagenet_tree(root / "src", imagenet_jpegs)
    out = root / "beton"
    subprocess.run([PYTHON, "-m", "data_pipeline.write", "imagenet", "--src", str(src), "--out", str(out),
                    "--val-size", "4", "--max-resolution", "96", "--num-workers", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return out, json.loads((out / "meta.json").read_text())["num_classes"]


def test_imagenet_script_trains_on_two_nodes_with_identical_weights(cluster, tmp_path, imagenet_beton):
    beton, num_classes = imagenet_beton
    uri = new_store(tmp_path / "mlruns.db")
    # Stands in for python: the same training, plus a weights digest per rank before the report.
    probe = tmp_path / "python-with-digest"
    probe.write_text('#!/bin/sh\n[ "$1 $2" = "-m launcher.train" ] || exit 3\nshift 2\n'
                     f'exec {PYTHON} {REPO}/tests/slurm_cluster.py digest-train "$@"\n')
    probe.chmod(0o755)
    job = submit(cluster, "imagenet.sh", tmp_path, "--nodes=2", "--ntasks-per-node=1",
                 IMAGENET_BETON_DIR=str(beton), RUN_DIR=str(tmp_path / "run"), MLFLOW_TRACKING_URI=uri,
                 PYTHON=str(probe), GLOBAL_BATCH="8",
                 EXTRA_ARGS=f"{TINY} model.num_classes={num_classes} model.input_size=64 data.image_size=64")
    info = finished(cluster, job, tmp_path, timeout=300)
    assert info["NodeList"] == "node[1-2]" and info["NumTasks"] == "2"

    log = job_log(tmp_path, job)
    assert "world_size=2 backend=gloo" in log and "micro 4 x accum 1 x world 2" in log
    digests = dict(re.findall(r"weights_sha256 rank=(\d) master=(\S+ [0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"}, log[-4000:]
    # Same master address (node1's NodeAddr: the fake name does not resolve) and same weights.
    assert digests["0"] == digests["1"], digests
    assert digests["0"].split(":")[0] in {"127.0.0.1", "node1"}

    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    ckpt = tmp_path / "run" / "checkpoints" / latest
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank00000.pt", "rng_rank00001.pt"}
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-1: one optimizer shard per rank
    (run,) = mlflow_runs(uri, "spikeprune-imagenet")
    assert run.info.status == "FINISHED"
    assert "energy_report.json" in artifacts(uri, run.info.run_id)
    assert run.data.params["model.name"] == "sew_resnet18"
