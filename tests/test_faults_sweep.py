"""An interrupted sweep (issue 17, item 6), for real: `python tuning/sweep.py` with two
trials one at a time, Ctrl-C (SIGINT to its process group) once the first trial has finished
and the second has a checkpoint, then the same command again.

The tracking URI holds a password and points at a closed port, so the whole sweep tracks
offline; its records are uploaded afterwards to a SQLite store, where the parent run must show
the final counts (not the interrupted pass's), and no file, log line or MLflow record may hold
the password or Ray's cluster token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_train import free_port, new_store
from test_sweep import REPO, _descendants, clean_env, sweep_data, write_sweep_config  # noqa: F401 (fixture)
from tuning.sweep import EXIT_INTERRUPTED, ray_temp_dir

PASSWORD = "sw33ppw"


def _trials(sweep_dir: Path) -> dict[str, Path]:
    return {d.name: d / "run" for d in sweep_dir.glob("trial_*") if d.is_dir()}


def _holding(roots: list[Path], needle: bytes) -> list[str]:
    return [str(p) for root in roots if root.exists() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("int")
    uri = f"http://user:{PASSWORD}@127.0.0.1:{free_port()}"
    config = write_sweep_config(base / "sweep.yaml", base, num_trials=2, max_concurrent_trials=1)
    doc = yaml.safe_load(config.read_text())
    doc["train_overrides"] = [o for o in doc["train_overrides"] if not o.startswith("tracking.tracking_uri=")]
    doc["train_overrides"].append(f"tracking.tracking_uri={uri}")
    config.write_text(yaml.safe_dump(doc))
    sweep_dir = base / "sweeps" / "t"
    cmd = [sys.executable, "tuning/sweep.py", "--config", str(config)]
    start = time.monotonic()
    with open(base / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            while True:  # the first trial finished, the second one past its first checkpoint
                runs = _trials(sweep_dir)
                done = [t for t, r in runs.items() if (r / "results.json").is_file()]
                going = [t for t, r in runs.items() if t not in done and (r / "checkpoints" / "latest").is_file()]
                if done and going:
                    break
                assert first.poll() is None, (base / "first.log").read_text()[-3000:]
                assert time.monotonic() - start < 480, "no finished trial and checkpointed second in 480 s"
                time.sleep(0.5)
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the driver and every process it started
            first_rc = first.wait(timeout=240)
        finally:  # whatever is left of it, by PID and by its process group
            for pid in ([first.pid, *_descendants(first.pid)] if first.poll() is None else []):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(first.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            first.wait()
    first_log = (base / "first.log").read_text()
    before = {t: (r / "results.json").stat().st_mtime_ns for t, r in _trials(sweep_dir).items()
              if (r / "results.json").is_file()}
    first_summary = json.loads((sweep_dir / "summary.json").read_text())
    second = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    yield {"base": base, "sweep_dir": sweep_dir, "first_rc": first_rc, "first_log": first_log,
           "first_summary": first_summary, "finished_before": before, "interrupted": going[0],
           "second": second, "summary": json.loads((sweep_dir / "summary.json").read_text())}
    ray_dir = Path(ray_temp_dir(sweep_dir))
    if base not in ray_dir.parents:  # pytest's folders are too deep for Ray's socket paths
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_running_anything_twice(interrupted_sweep):
    s = interrupted_sweep
    assert s["first_rc"] == EXIT_INTERRUPTED, s["first_log"][-3000:]
    assert s["first_summary"]["counts"]["finished"] == 1, s["first_summary"]["counts"]
    second = s["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"continuing the sweep in {s['sweep_dir']}" in second.stdout
    summary = s["summary"]
    assert summary["counts"]["finished"] == 2 and len(summary["trials"]) == 2, summary["counts"]
    # Finished trials are kept as they were; the interrupted one resumed from its checkpoint.
    for trial, mtime in s["finished_before"].items():
        assert (s["sweep_dir"] / trial / "run" / "results.json").stat().st_mtime_ns == mtime, f"{trial} ran again"
    interrupted_run = s["sweep_dir"] / s["interrupted"] / "run"
    assert f"resuming from {interrupted_run / 'checkpoints'}" in second.stdout + second.stderr
    epochs = json.loads((interrupted_run / "tune_epochs.json").read_text())
    assert sorted(epochs) == ["finetune/0", "search/0", "search/1"]
    # The Pareto output covers both trials.
    text = (s["sweep_dir"] / "results.txt").read_text()
    assert "sweep t: 2 trials, 2 finished" in text and "Pareto front" in text
    assert summary["pareto_front"] and set(summary["pareto_front"]) <= {t["trial_id"] for t in summary["trials"]}
    assert summary["pass"] == s["first_summary"]["pass"] + 1


@pytest.mark.slow
def test_parent_run_reports_the_restarted_counts(interrupted_sweep):
    """The parent run's records (kept offline) uploaded to a store: its counts are the final
    ones in summary.json, not the interrupted pass's."""
    from mlflow import MlflowClient

    s = interrupted_sweep
    store = new_store(s["base"] / "store" / "mlruns.db")
    up = subprocess.run([sys.executable, "-m", "launcher.tracking", "upload", str(s["sweep_dir"]),
                         "--tracking-uri", store], cwd=REPO, env=clean_env(), capture_output=True,
                        text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    parent = MlflowClient(store).get_run((s["sweep_dir"] / "mlflow_run_id").read_text().strip())
    counts = s["summary"]["counts"]
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.metrics[f"{k}_trials"] for k in counts} == {k: float(v) for k, v in counts.items()}
    history = MlflowClient(store).get_metric_history(parent.info.run_id, "finished_trials")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 2.0)]


@pytest.mark.slow
def test_no_password_or_ray_token_in_files_logs_or_mlflow(interrupted_sweep):
    s = interrupted_sweep
    outputs = s["first_log"] + s["second"].stdout + s["second"].stderr
    # Everything but the user's own sweep.yaml: the sweep dir, Ray's session logs, the store.
    roots = [s["sweep_dir"], Path(ray_temp_dir(s["sweep_dir"])), s["base"] / "store"]
    assert "***@127.0.0.1" in (s["sweep_dir"] / "sweep_config.yaml").read_text()  # there, redacted
    assert PASSWORD not in outputs
    assert _holding(roots, PASSWORD.encode()) == []
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.is_file():  # Ray's token of the local instance (token auth is on by default)
        token = token_file.read_text().strip()
        assert token and token not in outputs and _holding(roots, token.encode()) == []
