"""The training entry point end to end, single process on CPU: real FFCV files (a few hundred
Fashion-MNIST images), real DeepSpeed engines, a real MLflow SQLite store, the CLI as a
subprocess. Settings: configs/test_tiny.yaml (6 steps of search, 6 of fine-tuning).

- the MLflow run holds the metrics and artifacts a user looks for;
- SIGTERM mid-epoch, then the same command again: identical final weights and masks, same
  MLflow run, every train_loss step exactly once (a stale half-written checkpoint ignored);
- ZeRO stages 1 and 2 end where stage 0 ends;
- wrong inputs end with one `error:` line and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers_train import (N_TEST, N_TRAIN, N_VAL, REPO, TINY_CONFIG, clean_env, latest_checkpoint, masks_of, max_abs_diff, module_state,
                           new_store, overrides, reference_run, run_train, tiny_data, train_cmd)
from launcher.checkpoint import MARKER, safe_load
from launcher.preemption import EXIT_REQUEUE, EXIT_TERMINATED

STEPS = 12  # optimizer steps of configs/test_tiny.yaml: 6 search + 6 fine-tune
METRICS = ("train_loss", "penalty", "beta", "val_top1", "val_top1_hard", "weight_keep", "neuron_keep",
           "connectivity", "sops_per_sample", "test_top1", "test_top5", "energy_pj_per_sample",
           "energy_ratio")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
    return reference_run(tmp_path_factory.getbasetemp())


def only_run(store: str):
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]} (max |diff| {max_abs_diff(a, b)})"


@pytest.mark.slow
def test_mlflow_run_holds_metrics_and_artifacts(reference):
    client, run = only_run(reference.store)
    assert run.info.status == "FINISHED"
    assert (reference.run_dir / "mlflow_run_id").read_text() == run.info.run_id
    missing = [k for k in METRICS if k not in run.data.metrics]
    assert not missing, f"metrics missing from the MLflow run: {missing}"
    assert steps_of(client, run.info.run_id, "train_loss") == list(range(1, STEPS + 1))
    assert steps_of(client, run.info.run_id, "beta") == list(range(1, STEPS // 2 + 1))  # search only
    assert len(steps_of(client, run.info.run_id, "val_top1")) == 2  # one per epoch
    assert run.data.params["model.width"] == "0.0625" and run.data.params["pruning.lambda_w"] == "1e-11"

    # The final metrics are the test-set report's, as energy_report.json has them.
    report = json.loads((reference.run_dir / "energy_report.json").read_text())
    assert report["dense_reference_sops"] == 5e6 and report["sops_per_sample"] > 0
    for key in ("sops_per_sample", "energy_pj_per_sample", "energy_ratio", "weight_keep", "connectivity"):
        assert run.data.metrics[key] == pytest.approx(report[key]), key
    assert run.data.metrics["energy_ratio"] == pytest.approx(5e6 / report["sops_per_sample"])
    results = json.loads((reference.run_dir / "results.json").read_text())
    assert run.data.metrics["test_top1"] == results["test_top1"] and 0 <= results["test_top1"] <= 1

    # The data lineage: the three .beton files as dataset inputs, with counts and digests.
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    counts = {"training": N_TRAIN, "validation": N_VAL, "test": N_TEST}
    for context, ds in inputs.items():
        profile = json.loads(ds.profile)
        assert profile["num_samples"] == counts[context], context
        split = {"training": "train", "validation": "val", "test": "test"}[context]
        path = Path(reference.args[0].split("=", 1)[1]) / f"{split}.beton"
        assert ds.source == str(path.resolve()) and ds.name == f"demo/{split}"
        assert ds.digest == hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    assert results["test_samples"] == N_TEST

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"energy_report.json", "energy_per_layer.png", "mask_histograms.png", "masks.spm",
            "checkpoint"} <= artifacts, artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best_model.pt"]
    local = Path(client.download_artifacts(run.info.run_id, "energy_report.json"))
    assert json.loads(local.read_text()) == report
    # Nothing left waiting for an upload.
    assert (reference.run_dir / "mlflow_pending.jsonl").read_text() == ""


def zip_members(path: Path) -> dict[str, bytes]:
    """A zip's contents without its timestamps (the bit-packed mask file is a zip)."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def signal_when(args: list[str], log_path: Path, ready, sig: signal.Signals) -> tuple[int, str]:
    """Start training, send `sig` as soon as `ready()`, return (exit code, output)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_cmd(*args), cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not ready():
                assert proc.poll() is None, f"training ended (exit {proc.returncode}) too early"
                assert time.monotonic() < deadline, "not ready after 240 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log_path.read_text()


def _plant_stale_checkpoints(root: Path, real: Path) -> None:
    """What a crash in the middle of a save leaves behind, at newer steps than the real one."""
    partial = root / "step000000090.partial"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)
    unmarked = root / "step000000091"  # renamed but its marker gone (crash during a removal)
    shutil.copytree(real, unmarked)
    (unmarked / MARKER).unlink()
    state_file = unmarked / "mp_rank_00_model_states.pt"
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])


def _finetune_checkpoint_written(root: Path) -> bool:
    for marker in root.glob(f"step*/{MARKER}"):
        try:
            if json.loads(marker.read_text())["state"]["phase"] == "finetune":
                return True
        except (OSError, ValueError):  # a directory being renamed or removed right now
            continue
    return False


@pytest.mark.slow
def test_sigterm_mid_search_and_in_finetune_then_resume_equals_uninterrupted(reference, data_dir, tmp_path):
    """One run preempted twice: mid-epoch in the search (stale half-saved checkpoints planted
    beside the real one), then after hardening (the resume-after-hardening branch: hard masks
    and frozen logits come back from the checkpoint, the fine-tune LR restarts where it was).
    The result is the uninterrupted run's, bit for bit, in one MLflow run."""
    run_dir, store = tmp_path / "run", new_store(tmp_path / "mlruns.db")
    args = overrides(data_dir, run_dir, store, "checkpoint.every_steps=1")
    root = run_dir / "checkpoints"
    code, log = signal_when(args, tmp_path / "log.txt", lambda: any(root.glob(f"step*/{MARKER}")), signal.SIGTERM)
    assert code == EXIT_TERMINATED, log[-3000:]
    stopped = json.loads((latest_checkpoint(run_dir) / MARKER).read_text())["state"]
    assert stopped["phase"] == "search" and 0 < stopped["batch_in_epoch"] < 6, stopped  # mid-epoch
    client, run = only_run(store)
    assert run.info.status == "KILLED"
    assert steps_of(client, run.info.run_id, "train_loss") == list(range(1, stopped["step"] + 1))
    assert stopped["mlflow_run_id"] == run.info.run_id

    _plant_stale_checkpoints(root, latest_checkpoint(run_dir))
    code, log = signal_when(args, tmp_path / "log2.txt", lambda: _finetune_checkpoint_written(root), signal.SIGTERM)
    assert code == EXIT_TERMINATED, log[-3000:]
    assert f"resuming from {root / 'step{:09d}'.format(stopped['step'])} " in log, log[-2000:]
    stopped = json.loads((latest_checkpoint(run_dir) / MARKER).read_text())["state"]
    assert stopped["phase"] == "finetune" and stopped["step"] < STEPS, stopped
    resumed = run_train(args)
    assert f"resuming from {root / 'step{:09d}'.format(stopped['step'])} " in resumed.stdout, resumed.stdout[-2000:]
    assert "finetune epoch" in resumed.stdout or "[finetune" in resumed.stdout

    # Same weights, BN statistics and mask logits as the uninterrupted run, bit for bit.
    final, expected = module_state(latest_checkpoint(run_dir)), module_state(latest_checkpoint(reference.run_dir))
    assert_same_tensors(final, expected)
    assert_same_tensors(safe_load(run_dir / "best_model.pt"), safe_load(reference.run_dir / "best_model.pt"))
    assert zip_members(run_dir / "masks.spm") == zip_members(reference.run_dir / "masks.spm")
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(
        (reference.run_dir / "results.json").read_text())

    # One MLflow run, continued twice: each step once, with the uninterrupted run's values.
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and (run_dir / "mlflow_run_id").read_text() == run.info.run_id
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    ref_client, ref_run = only_run(reference.store)
    ref_history = ref_client.get_metric_history(ref_run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == sorted((m.step, m.value) for m in ref_history)


@pytest.mark.slow
def test_usr1_during_set_up_checkpoints_at_the_first_step(data_dir, tmp_path):
    """SLURM may signal while loaders and the engine are still being built (tens of seconds at
    scale): the handler is installed first, so the run saves at its first step and exits 75."""
    run_dir, store = tmp_path / "run", new_store(tmp_path / "mlruns.db")
    # config.yaml is written before the loaders and the engine are built
    code, text = signal_when(overrides(data_dir, run_dir, store), tmp_path / "log.txt",
                             (run_dir / "config.yaml").exists, signal.SIGUSR1)
    assert code == EXIT_REQUEUE, text[-3000:]
    stopped = json.loads((latest_checkpoint(run_dir) / MARKER).read_text())["state"]
    assert stopped["step"] == 1 and stopped["phase"] == "search", stopped


ZERO_DRIVER = """
import sys
from launcher.train import main
for stage, run_dir in (("1", sys.argv[1]), ("2", sys.argv[2])):
    code = main(["--config", sys.argv[3], *sys.argv[4:], "checkpoint.run_dir=" + run_dir,
                 "deepspeed.zero_stage=" + stage])
    if code:
        sys.exit(code)
"""


@pytest.mark.slow
def test_zero_stages_1_and_2_match_stage_0(reference, data_dir, tmp_path):
    # Both stages in one process (train() called twice, as a tuning worker does).
    args = [a for a in overrides(data_dir, tmp_path / "unused", None) if not a.startswith("checkpoint.")]
    proc = subprocess.run([sys.executable, "-c", ZERO_DRIVER, str(tmp_path / "zero1"), str(tmp_path / "zero2"),
                           str(TINY_CONFIG), *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stage0 = module_state(latest_checkpoint(reference.run_dir))
    for stage in (1, 2):
        state = module_state(latest_checkpoint(tmp_path / f"zero{stage}"))
        diff = max_abs_diff(state, stage0)
        worst = max(diff, key=diff.get)
        assert diff[worst] < 1e-5, f"ZeRO {stage}: {worst} differs by {diff[worst]:.3g}"
        flipped = sum(int((a != b).sum()) for a, b in zip(masks_of(state).values(), masks_of(stage0).values()))
        assert flipped == 0, f"ZeRO {stage}: {flipped} mask entries differ from stage 0"
        assert zero_stage_saved(tmp_path / f"zero{stage}") == stage


def zero_stage_saved(run_dir: Path) -> int:
    """The ZeRO stage the checkpoint was written with (its optimizer shard files say so)."""
    tag = latest_checkpoint(run_dir)
    shards = list(tag.glob("*optim_states.pt"))
    return int(safe_load(shards[0])["ds_config"]["zero_optimization"]["stage"]) if shards else 0


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


@pytest.mark.slow
def test_bad_inputs_end_with_one_error_line(reference, data_dir, tmp_path):
    # A data dir without val.beton (the others linked, not copied).
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    for split in ("train", "test"):
        (no_val / f"{split}.beton").symlink_to(data_dir / f"{split}.beton")
    # A copy of the finished run whose every checkpoint is truncated on disk.
    truncated = tmp_path / "truncated"
    shutil.copytree(reference.run_dir / "checkpoints", truncated / "checkpoints")
    for f in (truncated / "checkpoints").glob("*/mp_rank_00_model_states.pt"):
        f.write_bytes(f.read_bytes()[:1000])

    cases = {
        "unknown key": (overrides(data_dir, tmp_path / "r1", None, "pruning.lamda_w=1e-11"),
                        ("pruning.lamda_w", "did you mean 'lambda_w'")),
        "negative lambda": (overrides(data_dir, tmp_path / "r2", None, "pruning.lambda_n=-1e-11"),
                            ("pruning.lambda_n", ">= 0")),
        # cifar10: a demo set missing a split is written again instead (data_pipeline.images.ensure_demo).
        "missing beton": (overrides(no_val, tmp_path / "r3", None, "data.dataset=cifar10"),
                          ("val.beton", str(no_val))),
        "truncated checkpoint": (overrides(data_dir, truncated, None),
                                 ("no usable checkpoint", "truncated", "mp_rank_00_model_states.pt")),
    }
    # Started together: most of each run is imports and set-up.
    procs = {name: subprocess.Popen(train_cmd(*args), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        line = _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                               *cases[name][1])
        assert proc.returncode == 2, (name, line)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # nothing started


@pytest.mark.slow
def test_mask_lr_follows_the_schedule_in_the_search_then_freezes(data_dir, tmp_path):
    """With a cosine schedule both optimizers decay over the search (as the reference's), the
    weights' LR restarts at finetune_lr for fine-tuning, and the hardened masks never move."""
    from model.schedules import lr_at

    store = new_store(tmp_path / "mlruns.db")
    run_dir = tmp_path / "run"
    run_train(overrides(data_dir, run_dir, store, "optim.schedule=cosine", "optim.mask_lr=1e-2"))
    client, run = only_run(store)
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("lr", "mask_lr")}
    search = STEPS // 2
    assert sorted(history["mask_lr"]) == list(range(1, search + 1))  # logged during the search only
    for step in range(1, search + 1):  # step k is taken at phase step k - 1
        assert history["mask_lr"][step] == pytest.approx(lr_at(step - 1, search, 1e-2, "cosine"))
        assert history["lr"][step] == pytest.approx(lr_at(step - 1, search, 1e-2, "cosine"))
    for step in range(search + 1, STEPS + 1):
        assert history["lr"][step] == pytest.approx(lr_at(step - search - 1, STEPS - search, 1e-3, "cosine"))
    assert history["mask_lr"][search] < history["mask_lr"][1] / 2
    sub = masks_of(module_state(run_dir / "checkpoints" / "subnetwork"))
    final = module_state(latest_checkpoint(run_dir))
    assert sub and all(torch.equal(sub[k], masks_of(final)[k]) for k in sub)
    logits = {k: v for k, v in module_state(run_dir / "checkpoints" / "subnetwork").items() if k.endswith("logits")}
    assert all(torch.equal(v, final[k]) for k, v in logits.items())
