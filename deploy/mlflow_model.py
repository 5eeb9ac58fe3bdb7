"""The compiled subnetwork as an MLflow model (docs/DEPLOY.md "MLflow model").

    python -m deploy.mlflow_model RUN_DIR [--name NAME]

logs the run's hardened network to the run's own MLflow run as a pyfunc model (`event_engine`:
the run's config, selected weights, masks, results and energy report, plus the code that runs
them) and registers it as NAME (default: the run's MLflow run name) with its test top-1, SOPs
per sample, energy and connectivity as version tags. The pyfunc compiles the event engine when
it is loaded and answers a batch of inputs with class scores, so that

    mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(images)
    mlflow models serve -m models:/NAME/VERSION --env-manager local -h 127.0.0.1 -p 5001

both run the engine. The store is the run's `tracking.tracking_uri` (MLFLOW_TRACKING_URI wins);
the registry needs a database-backed store (SQLite, a tracking server).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from deploy.rundir import DeployError, open_run

ARTIFACT_PATH = "event_engine"
# Logged as code (MLflow's models-from-code), not as a pickled object: loading the model runs
# this file, never unpickles anything (docs/RELIABILITY.md).
PYFUNC_FILE = Path(__file__).resolve().with_name("engine_pyfunc.py")
RUN_FILES = ("config.yaml", "best_model.pt", "masks.spm", "results.json", "energy_report.json")
CODE = ("deploy", "model", "launcher", "data_pipeline")  # what open_run and the engine import
VERSION_TAGS = {"test_top1": "test_top1", "sops_per_sample": "sops_per_sample",
                "energy_pj_per_sample": "energy_pj_per_sample", "connectivity": "connectivity"}


def _tracking(run) -> tuple[str, str]:
    """(store URI, MLflow run id) of the run; a DeployError when it was not tracked."""
    from launcher.tracking import resolve_tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(run.cfg.tracking)
    id_file = run.path / "mlflow_run_id"
    if not run.cfg.tracking.enabled or not id_file.is_file():
        raise DeployError(f"{run.path}: the run has no MLflow run (tracking.enabled was false); "
                          f"nothing to log the model to")
    return uri, id_file.read_text().strip()


def log_engine_model(run_dir: str | Path, name: str | None = None) -> tuple[str, str]:
    """Log RUN_DIR's hardened network to its MLflow run and register it; (name, version)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from deploy.engine import EventEngine

    run = open_run(run_dir)
    uri, run_id = _tracking(run)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = name or client.get_run(run_id).info.run_name
    engine = EventEngine.from_run(run)
    example = np.zeros((1, *engine.program.input_shape), np.float32)  # the signature: shapes, dtype
    scores = engine.run(example).logits.astype(np.float32)
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "run"
        files.mkdir()
        for f in RUN_FILES:
            if (run.path / f).is_file():
                shutil.copy2(run.path / f, files / f)
        with mlflow.start_run(run_id=run_id):  # the run itself, not a new one
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_PATH, python_model=str(PYFUNC_FILE), artifacts={"run": str(files)},
                code_paths=[str(repo / c) for c in CODE], signature=infer_signature(example, scores),
                pip_requirements=[])  # served with --env-manager local: this environment
    version = mlflow.register_model(info.model_uri, name)
    for tag, key in VERSION_TAGS.items():
        if run.results.get(key) is not None:
            client.set_model_version_tag(name, version.version, tag, str(run.results[key]))
    client.set_model_version_tag(name, version.version, "run_dir", str(run.path.resolve()))
    return name, version.version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--name", help="registered model name (default: the run's MLflow run name)")
    args = p.parse_args(argv)
    try:
        name, version = log_engine_model(args.run_dir, args.name)
    except DeployError as exc:
        print(f"deploy.mlflow_model: {exc}", file=sys.stderr)
        return 2
    print(f"registered {name} version {version}; load it with mlflow.pyfunc.load_model('models:/{name}/{version}'), "
          f"serve it with: mlflow models serve -m models:/{name}/{version} --env-manager local -h 127.0.0.1 -p 5001")
    return 0


if __name__ == "__main__":
    sys.exit(main())
