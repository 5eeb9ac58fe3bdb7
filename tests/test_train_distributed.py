"""Two ranks on CPU (gloo) under the real launchers, `torchrun` and `deepspeed`: the loss goes
down, every rank holds the same weights, BN statistics and masks after each epoch (and they
are the checkpoint's), and the ranks train on disjoint batches.

The ranks run `tests/helpers_train.py`, which is `launcher.train.main` plus a probe that records
per rank a digest of every training batch and of the module at each epoch end.
The deepspeed-launcher run also tracks to an MLflow server that is not there: training must
finish and keep every record in run_dir/mlflow_pending.jsonl.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_train import (REPO, TINY_CONFIG, clean_env, free_port, latest_checkpoint, module_state,
                           overrides, state_digest, tiny_data)

PROBE = REPO / "tests" / "helpers_train.py"
STEPS_PER_EPOCH = 16  # the whole tiny train split: 512 images / 2 ranks / batch 16
EPOCHS = 2
# Search only, no penalty and a high LR: the silent-at-init SNN starts to learn within ~20 steps.
LEARN = ["pruning.lambda_w=0", "pruning.lambda_n=0", "optim.lr=1e-2", "optim.mask_lr=1e-2",
         f"pruning.search_epochs={EPOCHS}", "pruning.finetune_epochs=0",
         f"steps_per_epoch_limit={STEPS_PER_EPOCH}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.getbasetemp())


def launch(cmd: list[str], run_dir: Path, timeout: float = 400) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    probes = [json.loads((run_dir / f"probe_rank{r}.json").read_text()) for r in range(2)]
    return proc, probes


def check_two_ranks(probes: list[dict], run_dir: Path) -> None:
    steps = EPOCHS * STEPS_PER_EPOCH
    assert [len(p["batches"]) for p in probes] == [steps, steps]
    # Sharded: no batch seen by both ranks.
    seen = [{b["x"] for b in p["batches"]} for p in probes]
    assert len(seen[0]) == len(seen[1]) == steps and not seen[0] & seen[1]
    # In sync after every epoch: parameters (weights + mask logits), BN statistics, hard masks.
    for e0, e1 in zip(*(p["epochs"] for p in probes), strict=True):
        for key in ("params", "buffers", "masks"):
            assert e0[key] == e1[key], f"ranks differ in {key} after {e0['phase']} epoch {e0['epoch']}"
    # ... and the checkpoint holds that state (no fine-tuning: the last epoch's is final).
    assert state_digest(module_state(latest_checkpoint(run_dir))) == probes[0]["epochs"][-1]["state"]
    # Learning: the loss of the global batch (mean over ranks) goes down.
    loss = np.mean([[b["loss"] for b in p["batches"]] for p in probes], axis=0)
    first, last = loss[:8].mean(), loss[-8:].mean()
    assert last < first - 0.004, f"loss did not go down: first 8 steps {first:.4f}, last 8 {last:.4f}"


@pytest.mark.slow
def test_torchrun_two_ranks(data_dir, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run_dir = tmp_path / "run"
    args = overrides(data_dir, run_dir, None, *LEARN)
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(PROBE), "--config", str(TINY_CONFIG), *args]
    proc, probes = launch(cmd, run_dir)
    assert "world_size=2 backend=gloo" in proc.stdout
    check_two_ranks(probes, run_dir)


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_with_tracking_server_down(data_dir, tmp_path):
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    run_dir = tmp_path / "run"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = overrides(data_dir, run_dir, closed, *LEARN)
    cmd = [deepspeed, "--num_accelerators", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(PROBE), "--config", str(TINY_CONFIG), *args]
    proc, probes = launch(cmd, run_dir)
    assert "world_size=2 backend=gloo" in proc.stdout
    check_two_ranks(probes, run_dir)

    # Training went on; one warning; every record kept for a later upload.
    assert proc.stderr.count(f"MLflow tracking at {closed} unavailable") == 1, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "mlflow_pending.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in records]
    assert kinds[0] == "run" and "params" in kinds and records[-1] == {"type": "status", "status": "FINISHED"}
    losses = [r["step"] for r in records if r["type"] == "metrics" and "train_loss" in r["metrics"]]
    assert losses == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    uploads = {Path(r["path"]).name for r in records if r["type"] == "artifact"}
    assert {"energy_report.json", "energy_per_layer.png", "mask_histograms.png", "masks.spm"} <= uploads
    assert not (run_dir / "mlflow_run_id").exists()  # the run was never created
