"""Faults in the files we read and write (issue 17): hostile pickles, credentials in the
tracking URI, servers' exposure, a demo set a crash left half written.

Everything is real: CIFAR-format batches built from real CIFAR-10 images, pickles that would
create a file when unpickled, a tiny real training run, `python -m deploy.export` /
`deploy.run` / `launcher.tracking upload` as subprocesses, a demo write killed with SIGKILL.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import DataError
from data_pipeline.images import read_cifar10
from helpers_train import REPO, clean_env

from test_data_images import make_cifar_tree


class _Plant:
    """Unpickling this runs `open(path, "w")`: a file appears iff a loader executed the pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_pickle(dest: Path, witness: Path, wrap=lambda x: x) -> None:
    """Write to `dest` a pickle that creates `witness` when loaded (inside `wrap`'s container)."""
    dest.write_bytes(pickle.dumps(wrap(_Plant(witness))))


# --------------------------------------------------------------------------- A: CIFAR-10 reader

def test_cifar_reader_takes_real_batches_and_runs_no_code(tmp_path, cifar10_images):
    images, labels = cifar10_images
    src = make_cifar_tree(tmp_path / "src", images, labels) / "cifar-10-batches-py"
    (train_x, train_y), (test_x, test_y), classes = read_cifar10(src)
    assert (test_x == images).all() and test_y.tolist() == labels.tolist() and len(train_x) == 20
    assert classes[3] == "cat"

    witness = tmp_path / "pwned"
    hostile_pickle(src / "data_batch_2", witness,
                   lambda x: {b"data": x, b"labels": [0], b"batch_label": b"training batch 2 of 5"})
    with pytest.raises(DataError) as err:
        read_cifar10(src)
    assert not witness.exists(), "the CIFAR-10 reader executed a pickle"
    message = str(err.value)
    assert message.startswith(f"{src / 'data_batch_2'}: not a CIFAR-10 python pickle") and "\n" not in message
    assert "refers to io.open" in message


# --------------------------------------------------------------------------- E: demo data

def _wait_for(path_glob, parent: Path, proc, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(parent.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, "the demo write ended before it could be killed"
        assert time.monotonic() < deadline, f"no {path_glob} in {timeout:g} s"
        time.sleep(0.05)


ENSURE = ("import sys; from launcher.config import load_config; from launcher.train import ensure_demo_data; "
          "ensure_demo_data(load_config('configs/demo.yaml', [f'data.data_dir={sys.argv[1]}']))")


@pytest.mark.slow
def test_demo_write_killed_halfway_is_repaired(tmp_path_factory, tmp_path):
    """SIGKILL while the demo set's train.beton is being written: nothing half written appears
    under the set's name. The set the writer before this fix left (train.beton alone) is
    repaired on the next start, in one line."""
    import json

    from helpers_train import tiny_data

    demo = tmp_path / "demo"
    cmd = [sys.executable, "-c", ENSURE, str(demo)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for("demo.partial-*/.train.beton.*.tmp", tmp_path, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not demo.exists(), "a killed write left a set under the final name"
    demo.mkdir()  # what the writer before the fix left: train.beton and nothing else
    shutil.copyfile(tiny_data(tmp_path_factory.getbasetemp()) / "train.beton", demo / "train.beton")

    out = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"{demo}: the demo set is incomplete (val.beton, test.beton missing: an earlier write was "
            f"interrupted); writing it again") in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "the killed write's folder is left"
    from data_pipeline.inspect import beton_summary

    counts = {s: beton_summary(demo / f"{s}.beton")["num_samples"] for s in ("train", "val", "test")}
    assert counts == json.loads((demo / "meta.json").read_text())["counts"] == {
        "train": 55000, "val": 5000, "test": 10000}


def test_incomplete_demo_folder_with_other_files_is_not_replaced(tmp_path):
    from launcher.config import load_config
    from launcher.train import ensure_demo_data

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "train.beton").write_bytes(b"")
    (demo / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as err:
        ensure_demo_data(load_config(REPO / "configs" / "demo.yaml", [f"data.data_dir={demo}"]))
    assert str(err.value) == (f"{demo}: incomplete demo set (val.beton, test.beton missing) beside other "
                              f"files (notes.txt, ...): not rewritten; move them or choose another "
                              f"data.data_dir")
    assert (demo / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- B: credentials

PASSWORD = "s3cretpw"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(Path(root).rglob("*")) if p.is_file() and needle in p.read_bytes()]


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A tiny real run whose tracking URI holds a password, its store unreachable (a closed
    port): training goes on offline and keeps every record in the pending file."""
    from helpers_train import free_port, overrides, run_train, tiny_data

    base = tmp_path_factory.mktemp("secret")
    uri = f"http://user:{PASSWORD}@127.0.0.1:{free_port()}"
    args = overrides(tiny_data(tmp_path_factory.getbasetemp()), base / "run", uri)
    proc = run_train(args)
    return {"run_dir": base / "run", "uri": uri, "args": args, "base": base,
            "output": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_password_in_tracking_uri_is_stored_and_printed_nowhere(secret_run):
    run_dir, uri = secret_run["run_dir"], secret_run["uri"]
    redacted = uri.replace(f"user:{PASSWORD}@", "***@")
    assert PASSWORD not in secret_run["output"]
    assert f"MLflow tracking at {redacted} unavailable" in secret_run["output"]  # warned, redacted
    assert _files_holding(run_dir, PASSWORD.encode()) == []
    assert f"tracking_uri: {redacted}" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "mlflow_pending.jsonl").stat().st_size > 0, "the store was unreachable"

    # The recorded store cannot be used without its password: one line, not a failed connect.
    up = [sys.executable, "-m", "launcher.tracking", "upload", str(run_dir)]
    out = subprocess.run(up, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and PASSWORD not in out.stdout + out.stderr
    assert out.stderr.strip() == (f"the run's store {redacted} needs credentials, which are never stored: "
                                  f"pass --tracking-uri URI (or set MLFLOW_TRACKING_URI)")

    # Sent later to a store: its database and artifacts hold no password either.
    from helpers_train import new_store
    from mlflow import MlflowClient

    store = secret_run["base"] / "store"
    uri = new_store(store / "mlruns.db")
    out = subprocess.run([*up, "--tracking-uri", uri], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert PASSWORD not in out.stdout + out.stderr
    run = MlflowClient(uri).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.params["tracking.tracking_uri"] == redacted and "test_top1" in run.data.metrics
    assert (store / "mlartifacts").is_dir() and _files_holding(store, PASSWORD.encode()) == []


def test_redaction_keeps_the_host_and_hides_every_password():
    from launcher.redact import is_redacted, redact, redact_text

    assert redact_text("http://u:p@ss@host:5000/x?y=1") == "http://***@host:5000/x?y=1"
    assert redact_text("tracking.tracking_uri=postgresql://me:pw@db/mlflow and sqlite:////a/b.db") == (
        "tracking.tracking_uri=postgresql://***@db/mlflow and sqlite:////a/b.db")
    assert redact({"a": ["https://t0ken@h", ("x",)], "n": 1}) == {"a": ["https://***@h", ("x",)], "n": 1}
    assert is_redacted("http://***@h") and not is_redacted("http://h") and not is_redacted(None)


# --------------------------------------------------------------------------- item 4: hostile files

def _one_line_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if "[WARNING]" not in line and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.mark.slow
def test_planted_pickles_are_never_executed(secret_run, tmp_path, capsys):
    """A pickle that creates a file when unpickled, planted as best_model.pt, masks.spm and
    every checkpoint file (model states with the budget and client state, RNG states): the
    reported results, the NIR export, the event engine and resuming never run it, and say in
    one line which file is not loadable."""
    import torch

    import deploy.export
    import deploy.run

    run_dir = tmp_path / "run"
    shutil.copytree(secret_run["run_dir"], run_dir)
    args = [a.replace(str(secret_run["run_dir"]), str(run_dir)) for a in secret_run["args"]]
    witness = tmp_path / "pwned"

    torch.save(_Plant(witness), run_dir / "best_model.pt")  # a real torch file; its pickle runs open()
    for cli in (["deploy.export", str(run_dir), "--format", "nir", "--out", str(tmp_path / "net.nir")],
                ["deploy.run", str(run_dir)]):
        module = deploy.export if cli[0] == "deploy.export" else deploy.run
        assert module.main(cli[1:]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert line.endswith(f"{run_dir}/best_model.pt is not loadable: it holds objects other than tensors, "
                             f"which are never unpickled"), line
    assert not witness.exists()

    shutil.copyfile(secret_run["run_dir"] / "best_model.pt", run_dir / "best_model.pt")
    hostile_pickle(run_dir / "masks.spm", witness)
    assert deploy.export.main([str(run_dir), "--format", "nir", "--out", str(tmp_path / "net.nir")]) == 2
    assert f"{run_dir / 'masks.spm'}: not a spikeprune mask file" in _one_line_error(capsys.readouterr().err)
    assert not witness.exists()

    # A finished run started again reports its results (and loads nothing it would run).
    torch.save(_Plant(witness), run_dir / "best_model.pt")
    from helpers_train import train_cmd

    again = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "has finished already" in again.stdout, again.stderr[-3000:]
    assert not witness.exists()

    # Resuming: every checkpoint file replaced by such a pickle (a real torch file), and each
    # COMPLETE.json rewritten to match (sizes, checksums): what someone who can write the run
    # dir can do. The weights-only loader refuses it; nothing runs.
    import hashlib
    import json

    planted = []
    for marker_path in sorted((run_dir / "checkpoints").glob("*/COMPLETE.json")):
        marker = json.loads(marker_path.read_text())
        for name in marker["files"]:
            if name.endswith(".pt"):
                f = marker_path.parent / name
                torch.save(_Plant(witness), f)
                marker["files"][name] = f.stat().st_size
                if name in marker.get("sha256", {}):
                    marker["sha256"][name] = hashlib.sha256(f.read_bytes()).hexdigest()
                planted.append(f)
        marker_path.write_text(json.dumps(marker))
    assert planted
    resumed = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True,
                             timeout=300)
    assert not witness.exists(), "resuming executed a planted checkpoint"
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no usable checkpoint in {run_dir / 'checkpoints'}: checkpoint file "), last
    assert "does not load" in last and "UnpicklingError" in last, last


def test_restore_refuses_tune_state_others_can_write(tmp_path, capsys):
    """Restoring a sweep unpickles Tune's tuner.pkl: one that group or others may write (or
    another user owns) is refused in one line, and never read."""
    from test_sweep import write_sweep_config
    from tuning.sweep import main

    config = write_sweep_config(tmp_path / "sweep.yaml", tmp_path)
    sweep_dir = tmp_path / "sweeps" / "t"
    sweep_dir.mkdir(parents=True)
    witness = tmp_path / "pwned"
    hostile_pickle(sweep_dir / "tuner.pkl", witness)
    (sweep_dir / "tuner.pkl").chmod(0o664)
    assert main(["--config", str(config)]) == 2
    assert not witness.exists()
    assert _one_line_error(capsys.readouterr().err) == (
        f"sweep error: {sweep_dir / 'tuner.pkl'} is writable by group or others: restoring the sweep would "
        f"unpickle (run) Tune's state from it; not restored (if you trust it, chown it or chmod go-w it; "
        f"else start over with another name=)")


# --------------------------------------------------------------------------- C: exposure

def test_printed_ui_commands_bind_localhost_and_hold_no_password(tmp_path):
    from launcher.config import TrackingConfig
    from launcher.tracking import Tracker

    store = f"sqlite:///{tmp_path}/mlruns.db"
    local = Tracker(TrackingConfig(enabled=False, tracking_uri=store), 0, tmp_path)
    assert local.ui_command(5001) == f"mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5001"
    remote = Tracker(TrackingConfig(enabled=False, tracking_uri=f"https://me:{PASSWORD}@mlflow.example:443"),
                     0, tmp_path)
    assert remote.ui_command() == "open https://***@mlflow.example:443"


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets that `pids` listen on (from `ss`)."""
    import re

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines()
            if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_local_ray_listens_on_loopback_only(tmp_path):
    import ray

    from test_sweep import _descendants
    from tuning.sweep import connect_ray

    # What this process (and any child) listened on before Ray: earlier tests in the same
    # pytest process can leave sockets (e.g. a gloo store) that are not Ray's.
    before = set(_listening({os.getpid(), *_descendants(os.getpid())}))
    connect_ray(None, 1, tmp_path)
    try:
        addresses = set(_listening({os.getpid(), *_descendants(os.getpid())})) - before
    finally:
        ray.shutdown()
    assert addresses, "found no listening Ray process"
    outward = sorted(a for a in addresses if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")))
    assert not outward, outward


def test_ray_cluster_script_keeps_token_auth_and_never_logs_the_token():
    """slurm/ray_tune.sh: token auth forced on (not a default a caller's environment could
    turn off), the dashboard off, and the token in no log line, file or command line."""
    script = (REPO / "slurm" / "ray_tune.sh").read_text()
    lines = [" ".join(line.split()) for line in script.replace("\\\n", " ").splitlines()
             if not line.lstrip().startswith("#")]
    assert "export RAY_AUTH_MODE=token" in lines
    assert not [line for line in lines if "RAY_AUTH_MODE" in line and line != "export RAY_AUTH_MODE=token"]
    one_node = lines.index("if (( ${#nodes[@]} == 1 )); then")  # one node: loopback only
    assert lines[one_node + 1:one_node + 3] == [
        "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}", "head_ip=127.0.0.1"]
    head = next(line for line in lines if "start --head" in line)
    assert "--include-dashboard=false" in head and "dashboard-host" not in script
    token_uses = [line for line in lines if "RAY_AUTH_TOKEN" in line]
    assert token_uses == ["export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(\"$PYTHON\" -c 'import secrets; "
                          "print(secrets.token_hex(32))')}"], token_uses
