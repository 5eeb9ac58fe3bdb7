"""What a user sees: `mlflow ui` on the store of a finished short run (127.0.0.1 only), the run
and its energy_report.json fetched through the server's REST API, and the run page rendered
by headless Chromium to a PNG that shows something. The server is stopped by its PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers_train import clean_env, free_port, reference_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture
def mlflow_ui(tmp_path_factory, tmp_path):
    """(base URL, reference run) with `mlflow ui` serving the reference run's store."""
    run = reference_run(tmp_path_factory.getbasetemp())
    port = free_port()
    log = open(tmp_path / "mlflow_ui.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", run.store,
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if get(f"{base}/health", timeout=2) == b"OK":
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, (tmp_path / "mlflow_ui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow ui not healthy after 90 s"
            time.sleep(0.5)
        yield base, run
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.slow
def test_run_and_report_through_the_ui_server(mlflow_ui, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (install.sh --test installs Debian's chromium)")
    base, run = mlflow_ui
    run_id = (run.run_dir / "mlflow_run_id").read_text().strip()

    got = json.loads(get(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}"))["run"]
    assert got["info"]["status"] == "FINISHED" and got["info"]["run_id"] == run_id
    metrics = {m["key"]: m["value"] for m in got["data"]["metrics"]}
    assert {"train_loss", "test_top1", "energy_pj_per_sample", "energy_ratio"} <= metrics.keys()

    query = urllib.parse.urlencode({"path": "energy_report.json", "run_uuid": run_id})
    report = json.loads(get(f"{base}/get-artifact?{query}"))
    assert report == json.loads((run.run_dir / "energy_report.json").read_text())
    assert metrics["energy_pj_per_sample"] == pytest.approx(report["energy_pj_per_sample"])

    # The run page, as a browser draws it once the single-page app has fetched its data.
    page = f"{base}/#/experiments/{got['info']['experiment_id']}/runs/{run_id}"
    png = tmp_path / "run_page.png"
    dom = chromium(tmp_path, f"--screenshot={png}", "--dump-dom", page)
    # The page is this run's (not an error or "run not found" page) ...
    assert run_id in dom and "tiny" in dom and "Finished" in dom, dom[-2000:]
    # ... and it was drawn: an empty skeleton page is nearly uniform; this one has text, tables, lines.
    assert png.is_file() and png.stat().st_size > 20_000, "no screenshot, or an almost empty one"
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1400)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, (pixels.std(), len(np.unique(pixels)))


def chromium(tmp_path: Path, *args: str) -> str:
    """Headless Debian chromium (docs/STACK.md, MLflow) with a throw-away profile; its stdout."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                           "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
                           "--window-size=1400,900", *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
