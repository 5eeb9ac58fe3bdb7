"""The event engine as an MLflow model (deploy/mlflow_model.py): logged to a real finished run's
MLflow run (SQLite store), registered with its figures as tags, and served by name and version
by `mlflow models serve` on 127.0.0.1, answering exactly as the engine does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.engine import EventEngine
from deploy.mlflow_model import main
from deploy.rundir import open_run
from helpers_train import REPO, clean_env, free_port, reference_run

NAME = "spikeprune_tiny_engine"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    run = reference_run(tmp_path_factory.getbasetemp())
    proc = subprocess.run([sys.executable, "-m", "deploy.mlflow_model", str(run.run_dir), "--name", NAME],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"registered {NAME} version 1" in proc.stdout
    opened = open_run(run.run_dir)
    x, _ = next(iter(opened.loader("test", 32)))  # real Fashion-MNIST test images
    x = x.numpy().astype(np.float32)
    return {"run": run, "x": x, "scores": EventEngine.from_run(opened).run(x).logits.astype(np.float32),
            "results": opened.results}


@pytest.mark.slow
def test_registered_model_is_served_by_name_with_the_engines_predictions(registered, tmp_path):
    """The version carries the run's figures and points at the training run; `mlflow models
    serve models:/NAME/1` (the pyfunc loader, from another directory, without the repository on
    PYTHONPATH: the model carries its code) answers on 127.0.0.1 exactly as the engine does.
    The server is stopped by its process group, also on failure."""
    from mlflow import MlflowClient

    version = MlflowClient(registered["run"].store).get_model_version(NAME, "1")
    for key in ("test_top1", "sops_per_sample", "energy_pj_per_sample", "connectivity"):
        assert float(version.tags[key]) == registered["results"][key], key
    assert version.run_id == (registered["run"].run_dir / "mlflow_run_id").read_text().strip()
    port = free_port()
    env = {k: v for k, v in clean_env(MLFLOW_TRACKING_URI=registered["run"].store).items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"inputs": registered["x"].tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            served = np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32)
        assert np.array_equal(served, registered["scores"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_run_without_mlflow_is_one_line(tmp_path, capsys):
    from launcher.config import load_config, save_config
    from model import build_model
    from model.masks import save_masks

    cfg = load_config(REPO / "configs" / "test_tiny.yaml", ["tracking.enabled=false"])
    save_config(cfg, tmp_path / "config.yaml")
    net = build_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T,
                      width=cfg.model.width, input_size=cfg.model.input_size)
    torch.save(net.state_dict(), tmp_path / "best_model.pt")
    save_masks(net, tmp_path / "masks.spm", cfg.model.name)
    (tmp_path / "results.json").write_text(json.dumps({"test_top1": 0.0}))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run has no MLflow run (tracking.enabled was false)" in err[0]
