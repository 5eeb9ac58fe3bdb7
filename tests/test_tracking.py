"""MLflow tracking against real SQLite stores: params/metrics/artifacts land, a resumed run is
the same run without duplicated steps, an unreachable server never stops training and its
records reach a store later through the upload command."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from launcher.config import TrackingConfig, flatten, load_config
from launcher.tracking import (PENDING_FILE, RUN_ID_FILE, Tracker, main, resolve_tracking_uri)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating the schema costs ~5 s."""
    db = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    return f"sqlite:///{db}"


def _cfg(uri: str, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=uri, experiment=kw.pop("experiment", "tests"), **kw)


def _history(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_params_metrics_artifacts_land(store, tmp_path):
    cfg = load_config(None, ["pruning.lambda_w=2e-11"])
    report = tmp_path / "energy_report.json"
    report.write_text('{"sops_per_sample": 8.5e6}')
    tr = Tracker(_cfg(store, run_name="basic"), rank=0, run_dir=tmp_path / "run")
    tr.log_params(flatten(cfg))
    for step in range(1, 4):
        tr.log_metrics({"train_loss": 1.0 / step, "beta": 5.0 * step}, step=step)
    tr.log_artifact(report)
    assert tr.finish() and tr.online

    client = MlflowClient(store)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "basic"
    assert run.data.params["pruning.lambda_w"] == "2e-11" and run.data.params["model.T"] == "8"
    assert _history(client, tr.run_id, "train_loss") == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(tr.run_id)] == ["energy_report.json"]
    # Artifacts are local, beside the database.
    assert run.info.artifact_uri.startswith(str(Path(store[len("sqlite:///"):]).parent / "mlartifacts"))
    assert (tmp_path / "run" / RUN_ID_FILE).read_text() == tr.run_id
    assert (tmp_path / "run" / PENDING_FILE).read_text() == ""
    assert tr.ui_command().startswith(f"mlflow ui --backend-store-uri {store} --host 127.0.0.1")


def test_resume_continues_same_run_without_duplicates(store, tmp_path):
    run_dir = tmp_path / "run"
    first = Tracker(_cfg(store), rank=0, run_dir=run_dir)
    first.log_params({"seed": 0})
    for step in range(1, 6):
        first.log_metrics({"train_loss": float(step)}, step=step)
    first.finish("KILLED")  # preempted after step 5; the checkpoint was at step 3

    again = Tracker(_cfg(store), rank=0, run_dir=run_dir)
    assert again.run_id == first.run_id
    assert MlflowClient(store).get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"seed": 0})
    for step in range(4, 8):  # the loop re-logs everything after the checkpoint step
        again.log_metrics({"train_loss": float(step)}, step=step)
    again.finish()
    client = MlflowClient(store)
    assert _history(client, again.run_id, "train_loss") == [1, 2, 3, 4, 5, 6, 7]
    assert client.get_run(again.run_id).info.status == "FINISHED"

    by_id = Tracker(_cfg(store), rank=0, run_dir=tmp_path / "moved", run_id=first.run_id)
    assert by_id.run_id == first.run_id


def test_child_run_and_checkpoint_reference(store, tmp_path):
    parent = Tracker(_cfg(store, run_name="sweep"), rank=0, run_dir=tmp_path / "parent")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 4096)
    child = Tracker(_cfg(store, log_checkpoint=0.001), rank=0, run_dir=tmp_path / "child",
                    parent_run_id=parent.run_id)
    assert child.log_checkpoint(ckpt) is False  # 4 KiB > 0.001 MB: only the path is recorded
    small = Tracker(_cfg(store, log_checkpoint=True), rank=0, run_dir=tmp_path / "small")
    assert small.log_checkpoint(ckpt) is True
    for t in (parent, child, small):
        t.finish()
    client = MlflowClient(store)
    tags = client.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["checkpoint_path"] == str(ckpt)
    assert client.list_artifacts(child.run_id) == []
    assert [a.path for a in client.list_artifacts(small.run_id, "checkpoint")] == [
        "checkpoint/mp_rank_00_model_states.pt"]


def test_other_ranks_and_disabled_do_nothing(tmp_path):
    for tr in (Tracker(_cfg("http://127.0.0.1:9"), rank=1, run_dir=tmp_path / "r1"),
               Tracker(_cfg("http://127.0.0.1:9", enabled=False), rank=0, run_dir=tmp_path / "r0")):
        tr.log_params({"a": 1})
        tr.log_metrics({"x": 1.0}, step=1)
        assert tr.finish() and tr.run_id is None
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r0").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_buffers_then_uploads(store, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    run_dir = tmp_path / "run"
    report = tmp_path / "energy_report.json"
    report.write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = Tracker(_cfg(uri, run_name="offline", retry_every_s=0.01), rank=0, run_dir=run_dir)
        tr.log_params({"pruning.lambda_w": "1e-11"})
        for step in range(1, 4):
            tr.log_metrics({"train_loss": float(step)}, step=step)
        tr.log_metrics({"train_loss": 9.0}, step=3)  # a duplicate step: lands once
        tr.log_artifact(report)
        assert tr.finish() is False
    ours = [w for w in caught if "unavailable" in str(w.message)]
    assert len(ours) == 1 and str(run_dir / PENDING_FILE) in str(ours[0].message)
    assert tr.run_id is None and not tr.online
    assert len((run_dir / PENDING_FILE).read_text().splitlines()) == 8

    assert main(["upload", str(run_dir), "--tracking-uri", store]) == 0
    run_id = (run_dir / RUN_ID_FILE).read_text()
    assert run_id in capsys.readouterr().out
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params == {"pruning.lambda_w": "1e-11"}
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "train_loss"),
                                              key=lambda m: m.step)] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["energy_report.json"]
    assert main(["upload", str(run_dir), "--tracking-uri", store]) == 0  # nothing left: no-op
    assert "nothing pending" in capsys.readouterr().out


def test_comes_back_online_and_flushes(store, tmp_path):
    """The store appears while training runs: the next call after the retry delay uploads."""
    db = Path(store[len("sqlite:///"):])
    link = tmp_path / "mount"
    link.symlink_to(tmp_path / "not-mounted-yet")  # the store's folder is not there
    uri = f"sqlite:///{link / db.name}"
    with pytest.warns(UserWarning, match="unavailable"):
        tr = Tracker(_cfg(uri, retry_every_s=0.01), rank=0, run_dir=tmp_path / "run")
    tr.log_metrics({"x": 1.0}, step=1)
    assert not tr.online and tr.run_id is None
    link.unlink()
    link.symlink_to(db.parent)  # ... and now it is
    time.sleep(0.05)  # past retry_every_s
    tr.log_metrics({"x": 2.0}, step=2)
    assert tr.online and tr.run_id is not None
    tr.finish()
    assert _history(MlflowClient(store), tr.run_id, "x") == [1, 2]


def test_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///sub/x.db")) == \
        f"sqlite:///{tmp_path / 'sub' / 'x.db'}"


def test_fresh_store_created_by_two_processes_at_once(tmp_path):
    """MLflow's schema migration crashes when two processes create one SQLite DB; we lock."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    code = ("import sys; from launcher.config import TrackingConfig; from launcher.tracking import Tracker;"
            "t = Tracker(TrackingConfig(tracking_uri=sys.argv[1], experiment='race'), rank=0, run_dir=sys.argv[2]);"
            "t.log_metrics({'x': 1.0}, step=1); sys.exit(0 if t.finish() else 1)")
    procs = [subprocess.Popen([sys.executable, "-W", "error::UserWarning", "-c", code, uri,
                               str(tmp_path / f"run{i}")], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert len(runs) == 2


def test_torn_pending_line_after_a_crash(store, tmp_path):
    """A process killed mid-append leaves half a JSON line: it is skipped, nothing else is lost."""
    run_dir = tmp_path / "run"
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.warns(UserWarning, match="unavailable"):
        first = Tracker(_cfg(uri), rank=0, run_dir=run_dir)
    first.log_metrics({"x": 1.0}, step=1)
    with open(run_dir / PENDING_FILE, "a") as f:
        f.write('{"type": "metrics", "step": 2, "timest')  # killed here
    with pytest.warns(UserWarning, match="unavailable"):
        again = Tracker(_cfg(uri), rank=0, run_dir=run_dir)  # restarted, still offline
    again.log_metrics({"x": 3.0}, step=3)
    assert main(["upload", str(run_dir), "--tracking-uri", store]) == 0
    run_id = (run_dir / RUN_ID_FILE).read_text()
    assert _history(MlflowClient(store), run_id, "x") == [1, 3]
