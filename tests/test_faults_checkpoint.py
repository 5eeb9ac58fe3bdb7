"""Faults injected for real into checkpoints, resume, the run-dir lock and the MLflow pending log.

- kill -9 at chosen moments of one short real run (configs/test_tiny.yaml, a checkpoint every
  2 steps), each time started again with the same command, until it finishes: it resumes
  from the newest complete checkpoint, ends with the uninterrupted run's weights, and the
  MLflow store holds every (metric, step) of that run exactly once;
- damaged checkpoints (truncated, same-size corruption, `latest` deleted or naming a missing
  tag, COMPLETE.json missing keys): one line, then the previous complete one (or a refusal);
- a checkpoint write that fails half-way (RLIMIT_FSIZE in the child) keeps the previous one;
- weights holding NaN/inf are never saved;
- a second writer on a run dir or sweep dir is refused at once, naming the holder.

How the kills land where they must: the run is started through KILLER, which is
`launcher.train.main` plus a `sys.addaudithook` hook that sends the process SIGKILL at the
n-th audit event matching a path (CPython raises "open" when a file is opened, os.open and
mkstemp included, and "os.rename" for os.rename/os.replace, before doing it). A kill at the
rename of `.latest.*.tmp` lands while `latest` is being written (the new one complete in its
temp file, not in place yet), at the rename of `<tag>.partial` just before a checkpoint is
committed, and so on. Nothing in the product is replaced or patched: the hook only observes,
the process dies by a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers_train import (REPO, clean_env, new_store, overrides, reference_run, tiny_data, train_cmd)
from launcher.checkpoint import (LATEST, MARKER, CheckpointError, TrainState, find_resumable, load_checkpoint,
                                 safe_load, save_checkpoint)
from launcher.run_lock import LOCK_FILE, DirLock, DirLocked
from test_checkpoint import _engine, _train

KILLER = r"""
import os, signal, sys
event, needle, nth = os.environ["KILL_AT"].split("|")
after = os.environ.get("KILL_AFTER")  # "event|needle": count only once this has happened
armed, seen = [after is None], [0]

def hook(name, args):
    if armed[0]:
        if name == event and needle in " ".join(map(str, args[:2])):
            seen[0] += 1
            if seen[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
    elif name == after.split("|")[0] and after.split("|")[1] in " ".join(map(str, args[:2])):
        armed[0] = True

sys.addaudithook(hook)
from launcher.train import main
sys.exit(main(sys.argv[1:]))
"""


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def newest_committed(run_dir: Path) -> Path:
    """The newest step<N> directory holding a COMPLETE.json (what a resume must pick if intact)."""
    found = [p for p in (run_dir / "checkpoints").glob("step*") if re.fullmatch(r"step\d+", p.name)
             and (p / MARKER).is_file()]
    return max(found, key=lambda p: int(p.name[4:]))


def resumed_from(output: str) -> str | None:
    m = re.search(r"^resuming from (\S+) \(", output, re.M)
    return m.group(1) if m else None


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def overwrite_inside_largest_tensor(path: Path, nbytes: int = 4096) -> None:
    """Same-size damage: `nbytes` of 0xff (NaN as float32) in the middle of the largest tensor."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= nbytes, info
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - nbytes // 2)
        f.write(b"\xff" * nbytes)


def last_error_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- kill -9, resumed


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """One real run stopped at five moments (four kills -9, one write-size limit) and started again each time, to the end.

    Returns {"stages": [(name, exit code, output, newest committed checkpoint after it)], "run_dir",
    "store", "damaged", "second_writer"}."""
    base = tmp_path_factory.getbasetemp()
    data_dir = tiny_data(base)
    root = tmp_path_factory.mktemp("killed")
    run_dir, store = root / "run", new_store(root / "mlruns.db")
    args = overrides(data_dir, run_dir, store, "checkpoint.every_steps=2")
    stages: list[tuple[str, int, str, Path]] = []

    def start(name, kill_at=None, kill_after=None, fsize=None):
        env = clean_env(**({"KILL_AT": kill_at} if kill_at else {}),
                        **({"KILL_AFTER": kill_after} if kill_after else {}))
        cmd = [sys.executable, "-c", KILLER, *train_cmd(*args)[3:]] if kill_at else train_cmd(*args)

        def limit():  # the child only; CPython ignores SIGXFSZ, so a write past it fails
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
                              preexec_fn=limit if fsize else None)
        stages.append((name, proc.returncode, proc.stdout + proc.stderr, newest_committed(run_dir)))
        return proc

    # 1. While `latest` is written after the step-4 checkpoint: the new one complete in its temp
    #    file, not renamed in (latest still names step 2).
    assert start("latest", "os.rename|/.latest.|2").returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / LATEST).read_text() == "step000000002"
    assert list((run_dir / "checkpoints").glob(".latest.*.tmp"))
    # 2. While tag step 6 is re-saved at the end of the epoch: the old version moved aside to
    #    step6.old, the new one complete in step6.partial, no step6.
    assert start("checkpoint", "os.rename|step000000006.partial |2").returncode == -signal.SIGKILL
    assert {"step000000006.old", "step000000006.partial"} <= set(tags(run_dir))
    # 3. While masks.spm is written at the end of the search (its temp file not renamed in).
    assert start("masks", "os.rename|/.masks.spm.|1").returncode == -signal.SIGKILL
    assert list(run_dir.glob(".masks.spm.*.tmp")) and not (run_dir / "masks.spm").exists()
    #    ... and then 4 KB of the newest checkpoint's largest tensor overwritten, size unchanged.
    damaged = newest_committed(run_dir) / "mp_rank_00_model_states.pt"
    overwrite_inside_largest_tensor(damaged)
    # 4. A file-size limit of half the model-states file: the next checkpoint fails half-way.
    start("fsize", fsize=damaged.stat().st_size // 2)
    # 5. Between an upload and the emptying of mlflow_pending.jsonl, during the fine-tuning.
    assert start("pending", "os.rename|/mlflow_pending.jsonl|1",
                 kill_after="os.rename|subnetwork.partial ").returncode == -signal.SIGKILL
    assert (run_dir / "mlflow_pending.jsonl").read_text()  # sent, still there
    # 6. To the end (energy_report.json and results.json are atomic writes like stage 3's);
    #    meanwhile (the first run stopped while it holds the lock) a second writer.
    log = root / "last.log"
    with open(log, "w") as out:
        last = subprocess.Popen(train_cmd(*args), cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            lock = run_dir / LOCK_FILE
            deadline = time.monotonic() + 300
            while not (lock.is_file() and f'"pid": {last.pid},' in lock.read_text()):
                assert last.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            last.send_signal(signal.SIGSTOP)
            before = snapshot(run_dir)
            started = time.monotonic()
            second = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True,
                                    text=True, timeout=300)
            second_writer = {"code": second.returncode, "stderr": second.stderr, "pid": last.pid,
                             "seconds": time.monotonic() - started, "untouched": snapshot(run_dir) == before}
            last.send_signal(signal.SIGCONT)
            code = last.wait(timeout=400)
        finally:
            if last.poll() is None:
                last.kill()
                last.wait()
    stages.append(("end", code, log.read_text(), newest_committed(run_dir)))
    return {"stages": stages, "run_dir": run_dir, "store": store, "damaged": damaged,
            "second_writer": second_writer}


def stage(killed_run, name: str) -> tuple[int, str, Path]:
    """(exit code, output, the newest committed checkpoint before it) of the start made after
    the one called `name`."""
    names = [s[0] for s in killed_run["stages"]]
    i = names.index(name)
    return killed_run["stages"][i + 1][1], killed_run["stages"][i + 1][2], killed_run["stages"][i][3]


@pytest.mark.slow
def test_each_start_after_a_kill_resumes_from_the_newest_complete_checkpoint(killed_run):
    ckpts = killed_run["run_dir"] / "checkpoints"
    _, out, _ = stage(killed_run, "latest")  # `latest` still named step 2: the newer step 4 wins
    assert resumed_from(out) == str(ckpts / "step000000004"), out[-3000:]
    _, out, _ = stage(killed_run, "checkpoint")  # the committed old version, not the .partial
    assert resumed_from(out) == str(ckpts / "step000000006.old"), out[-3000:]
    assert f"checkpoint {ckpts / 'step000000006'} was being replaced when the run stopped" in out
    code, out, newest = stage(killed_run, "pending")
    assert resumed_from(out) == str(newest), out[-3000:]
    assert code == 0, out[-3000:]
    assert not any(p.name.endswith((".partial", ".old")) for p in ckpts.iterdir())


@pytest.mark.slow
def test_same_size_corruption_falls_back_with_one_line(killed_run):
    _, out, _ = stage(killed_run, "masks")  # the fsize start came right after the damage
    damaged = killed_run["damaged"]
    lines = [line for line in out.splitlines() if "skipping damaged checkpoint" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"UserWarning: skipping damaged checkpoint: checkpoint file {damaged} is damaged (its sha256 "
        f"differs from the one in {MARKER}; same size)"), out[-3000:]
    assert resumed_from(out) == str(damaged.parents[1] / "step000000004"), out[-3000:]


@pytest.mark.slow
def test_a_write_failing_half_way_keeps_the_previous_checkpoint(killed_run):
    code, out, _ = stage(killed_run, "masks")  # the start under the file-size limit
    ckpts = killed_run["run_dir"] / "checkpoints"
    assert code == 2, out[-3000:]
    assert last_error_line(out).startswith(f"error: cannot write checkpoint {ckpts / 'step000000006.partial'}: ")
    assert "the checkpoints in" in last_error_line(out)
    _, out, _ = stage(killed_run, "fsize")  # and the next start resumes from what was there
    assert resumed_from(out) == str(ckpts / "step000000004"), out[-3000:]


@pytest.mark.slow
def test_killed_run_ends_with_the_uninterrupted_weights(killed_run, tmp_path_factory):
    reference = reference_run(tmp_path_factory.getbasetemp())
    run_dir = killed_run["run_dir"]
    ours, theirs = safe_load(run_dir / "best_model.pt"), safe_load(reference.run_dir / "best_model.pt")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(
        (reference.run_dir / "results.json").read_text())
    with zipfile.ZipFile(run_dir / "masks.spm") as a, zipfile.ZipFile(reference.run_dir / "masks.spm") as b:
        assert {n: a.read(n) for n in a.namelist()} == {n: b.read(n) for n in b.namelist()}


def metric_rows(store: str) -> tuple[str, list[tuple[str, int, float]]]:
    """(status, every stored (key, step, value) row) of the store's only run."""
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    return run.info.status, sorted((key, m.step, m.value) for key in run.data.metrics
                                   for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_mlflow_holds_every_metric_step_exactly_once(killed_run, tmp_path_factory):
    reference = reference_run(tmp_path_factory.getbasetemp())
    status, rows = metric_rows(killed_run["store"])
    ref_status, ref_rows = metric_rows(reference.store)
    assert status == ref_status == "FINISHED"
    keys = [(k, s) for k, s, _ in rows]
    assert len(keys) == len(set(keys)), sorted({x for x in keys if keys.count(x) > 1})
    assert rows == ref_rows  # no step missing, nothing extra, the same values
    assert (killed_run["run_dir"] / "mlflow_pending.jsonl").read_text() == ""


@pytest.mark.slow
def test_second_writer_is_refused_at_once_naming_the_holder(killed_run):
    second = killed_run["second_writer"]
    run_dir = killed_run["run_dir"]
    assert second["code"] == 2, second["stderr"][-3000:]
    line = last_error_line(second["stderr"])
    assert line.startswith(f"error: {run_dir} is in use by a training run, pid {second['pid']} on "), line
    assert line.endswith("wait for it to end, or choose another checkpoint.run_dir")
    assert second["untouched"]  # not a file of the first run's written or removed
    assert second["seconds"] < 120  # before any training: set-up only


# --------------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def dist_info():
    from launcher.distributed import setup_distributed

    return setup_distributed()


def _three_checkpoints(tmp_path):
    engine, _, cfg = _engine(0)
    for step in (2, 4, 6):
        _train(engine, 2)
        save_checkpoint(engine, tmp_path, TrainState(step=step), cfg, keep_last=3)
    return engine, cfg, tmp_path / "checkpoints"


def _resume(run_dir) -> tuple[str | None, list[str]]:
    """(tag find_resumable picks, the lines it warns)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = find_resumable(run_dir)
    lines = [str(w.message) for w in caught]
    assert all("\n" not in line for line in lines), lines
    return (ckpt.tag if ckpt else None), lines


def test_damaged_newest_checkpoints_fall_back_with_one_line_each(dist_info, tmp_path):
    engine, cfg, root = _three_checkpoints(tmp_path)
    states = root / "step000000006" / "mp_rank_00_model_states.pt"
    overwrite_inside_largest_tensor(states, 256)  # the tiny net's tensors: a few hundred bytes
    tag, lines = _resume(tmp_path)
    assert tag == "step000000004" and lines == [
        f"skipping damaged checkpoint: checkpoint file {states} is damaged (its sha256 differs from the "
        f"one in {MARKER}; same size)"]
    marker = json.loads((root / "step000000004" / MARKER).read_text())
    del marker["state"]
    (root / "step000000004" / MARKER).write_text(json.dumps(marker))
    tag, lines = _resume(tmp_path)
    assert tag == "step000000002" and lines[1] == (
        f"skipping damaged checkpoint: checkpoint marker {root / 'step000000004' / MARKER} is damaged "
        f"(missing state)")
    load_checkpoint(_engine(0, seed=3)[0], find_resumable(tmp_path))

    # Retention: the damaged ones never count, the newest good one survives keep_last=2.
    save_checkpoint(engine, tmp_path, TrainState(step=8), cfg, keep_last=2)
    assert tags(tmp_path) == ["step000000002", "step000000008"]

    (root / "step000000002" / "rng_rank00000.pt").write_bytes(b"")
    overwrite_inside_largest_tensor(root / "step000000008" / "mp_rank_00_model_states.pt", 256)
    with pytest.raises(CheckpointError) as err:
        find_resumable(tmp_path)
    assert str(err.value) == (f"no usable checkpoint in {root}: checkpoint file "
                              f"{root / 'step000000008' / 'mp_rank_00_model_states.pt'} is damaged (its "
                              f"sha256 differs from the one in {MARKER}; same size)")


def test_latest_deleted_or_naming_a_missing_tag(dist_info, tmp_path):
    _, _, root = _three_checkpoints(tmp_path)
    (root / LATEST).unlink()
    assert _resume(tmp_path) == ("step000000006", [
        f"{root / LATEST} is missing or empty: resuming from the newest verified checkpoint "
        f"{root / 'step000000006'}"])
    (root / LATEST).write_text("step000000099")
    assert _resume(tmp_path) == ("step000000006", [
        f"{root / LATEST} names 'step000000099', which is not a checkpoint in {root}: resuming from "
        f"the newest verified checkpoint {root / 'step000000006'}"])
    for tag in ("step000000002", "step000000004", "step000000006"):
        (root / tag / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"latest names 'step000000099' but .* holds no complete"):
        find_resumable(tmp_path)


def test_older_checkpoints_without_digests_still_load(dist_info, tmp_path):
    engine, _, root = _three_checkpoints(tmp_path)
    marker = json.loads((root / "step000000006" / MARKER).read_text())
    del marker["sha256"]
    (root / "step000000006" / MARKER).write_text(json.dumps(marker))
    assert _resume(tmp_path) == ("step000000006", [])
    load_checkpoint(_engine(0, seed=3)[0], find_resumable(tmp_path))


def test_a_partial_checkpoint_is_never_resumed_and_an_old_one_is_recovered(dist_info, tmp_path):
    engine, cfg, root = _three_checkpoints(tmp_path)
    # A kill after COMPLETE.json, before the rename: step 8 complete but not committed.
    os.rename(root / "step000000006", root / "step000000008.partial")
    marker = json.loads((root / "step000000008.partial" / MARKER).read_text())
    marker["state"]["step"] = 8
    (root / "step000000008.partial" / MARKER).write_text(json.dumps(marker))
    assert _resume(tmp_path)[0] == "step000000004"
    # A kill while step 4 is re-saved: its previous version in step4.old, no step4.
    os.rename(root / "step000000004", root / "step000000004.old")
    assert _resume(tmp_path)[0] == "step000000004.old"
    save_checkpoint(engine, tmp_path, TrainState(step=10), cfg, keep_last=3)  # put back, leftovers gone
    assert tags(tmp_path) == ["step000000002", "step000000004", "step000000010"]


def test_non_finite_weights_are_never_saved(dist_info, tmp_path):
    engine, cfg, root = _three_checkpoints(tmp_path)
    before = snapshot(root)
    with torch.no_grad():
        engine.module.fc2.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(engine, tmp_path, TrainState(step=8), cfg, keep_last=1)
    assert str(err.value) == (f"not saving checkpoint step000000008 at step 8: fc2.weight holds NaN or inf; "
                              f"the checkpoints in {root} are kept as they were")
    assert snapshot(root) == before


@pytest.mark.slow
def test_a_run_driven_to_inf_saves_no_non_finite_state(tmp_path_factory, tmp_path):
    """A real override: plain SGD at lr=3e38 overflows the first BatchNorm's running variance
    at step 2 while the loss is still finite; the step-2 checkpoint is refused."""
    data_dir = tiny_data(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    args = overrides(data_dir, run_dir, None, "checkpoint.every_steps=1", "optim.weight_optimizer=sgd",
                     "optim.lr=3e38")
    proc = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_error_line(proc.stderr).startswith("error: not saving checkpoint step"), proc.stderr[-3000:]
    saved = [p for p in (run_dir / "checkpoints").glob("*/mp_rank_00_model_states.pt")]
    assert saved, "the first (finite) checkpoint is kept"
    for f in [*saved, *run_dir.glob("best_model.pt")]:
        state = safe_load(f)
        state = state.get("module", state)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), f


# --------------------------------------------------------------------------- two writers

HOLDER = """
import sys, time
from launcher.run_lock import DirLock
DirLock(sys.argv[1], sys.argv[2], "-").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_two_sweeps_and_an_upload_on_a_held_dir_are_refused(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "one"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(sweep_dir), "sweep"], cwd=REPO,
                              env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        sweep = subprocess.run([sys.executable, "tuning/sweep.py", "--config", "configs/sweep_demo.yaml",
                                f"storage_path={sweep_dir.parent}", "name=one"], cwd=REPO, env=clean_env(),
                               capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 2, sweep.stderr[-3000:]
        assert last_error_line(sweep.stderr).startswith(
            f"sweep error: {sweep_dir} is in use by a sweep, pid {holder.pid} on "), sweep.stderr[-3000:]
        assert sorted(p.name for p in sweep_dir.iterdir()) == [LOCK_FILE]  # nothing written

        from launcher.tracking import main as tracking_main

        (sweep_dir / "mlflow_pending.jsonl").write_text('{"type": "status", "status": "RUNNING"}\n')
        assert tracking_main(["upload", str(sweep_dir), "--tracking-uri", "sqlite:///unused.db"]) == 2

        holder.send_signal(signal.SIGKILL)  # a holder killed -9 leaves no lock behind
        holder.wait(timeout=60)
        with DirLock(sweep_dir, "sweep", "name="):
            with pytest.raises(DirLocked, match=f"in use by a sweep, pid {os.getpid()} "):
                DirLock(sweep_dir, "sweep", "name=").acquire()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# --------------------------------------------------------------------------- MLflow run creation

CREATE_THEN_DIE = r"""
import os, signal, sys
sys.addaudithook(lambda name, args: name == "open" and "/.mlflow_run_id." in str(args[0])
                 and os.kill(os.getpid(), signal.SIGKILL))
from launcher.config import TrackingConfig
from launcher.tracking import Tracker
Tracker(TrackingConfig(tracking_uri=sys.argv[1], experiment="orphans"), 0, sys.argv[2])
"""


def test_a_kill_right_after_the_mlflow_run_is_created_makes_no_second_run(tmp_path):
    from launcher.config import TrackingConfig
    from launcher.tracking import Tracker

    store, run_dir = new_store(tmp_path / "mlruns.db"), tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CREATE_THEN_DIE, store, str(run_dir)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("orphans").experiment_id
    assert len(client.search_runs([exp])) == 1 and not (run_dir / "mlflow_run_id").exists()
    again = Tracker(TrackingConfig(tracking_uri=store, experiment="orphans"), 0, run_dir)
    again.log_metrics({"x": 1.0}, step=1)
    assert again.finish()
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [again.run_id] and runs[0].data.metrics == {"x": 1.0}
