"""MLflow tracking from rank 0 that never stops training.

Every record (params, metrics, tags, artifacts, status) is first appended to
`<run_dir>/mlflow_pending.jsonl` and then uploaded in batches (every few seconds, and at once
for params/artifacts/status). If the store cannot be reached the records simply stay in that
file: training goes on, one warning is printed, the upload is retried every
`tracking.retry_every_s` seconds on later calls, and whatever is left at exit can be sent
later with

    python -m launcher.tracking upload RUN_DIR [--tracking-uri URI]

Resume: the run id lives in `<run_dir>/mlflow_run_id` (and in the checkpoint); a restarted
run continues the same MLflow run. Uploading is idempotent per (metric key, step): on
connecting to an existing run its metric history is read and steps already there are
skipped, so the loop may simply re-log everything after the checkpoint step, and a record
uploaded twice (crash between upload and truncation) lands once. Consequence for callers:
never log the same key twice at one step. Under kill -9 at any moment nothing is lost or
doubled: a record is in the file before it is sent, the file is emptied (atomically) only
after all it held has landed, a torn last line is skipped (its step comes after the last
checkpoint, so the resumed run logs it again), and a run created just before the kill, its
id not saved yet, is found again by the key of its run record. One writer per run dir: the
training run holds launcher/run_lock.py's lock, and the upload command takes it too.

Store: `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlruns.db`
with artifacts in `mlartifacts/` beside the database. A fresh SQLite database is created
under a file lock (two processes creating the schema at once crash MLflow's migrations).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from launcher.config import TrackingConfig
from launcher.redact import is_redacted, redact, redact_text
from launcher.run_lock import DirLock, DirLocked
from model.atomic import atomic_write

PENDING_FILE = "mlflow_pending.jsonl"
RUN_ID_FILE = "mlflow_run_id"
RUN_KEY_TAG = "spikeprune.run_key"  # set at creation from the pending run record
FLUSH_EVERY_S = 5.0  # metric upload interval while the store is reachable
HTTP_TIMEOUT_S = 10  # per request; MLflow's default is 120 s with 7 retries
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached (or refused the run)."""


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """The store URI with relative SQLite paths made absolute (Ray trials change cwd)."""
    uri = (cfg.tracking_uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlruns.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client(uri: str):
    if uri.startswith(("http://", "https://")):
        # Fail fast instead of MLflow's minutes of retries; user settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_store(uri: str):
    """A client on a store whose schema exists: created under a file lock, because MLflow
    builds a fresh SQLite schema when the client is made. Call before fanning out."""
    with _store_lock(uri):
        client = _client(uri)
        client.search_experiments(max_results=1)
    return client


def _experiment_id(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = _sqlite_path(uri)
    location = str(db.parent / "mlartifacts") if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another process created it meanwhile
        if exp is None:
            raise
        return exp.experiment_id


FULL_DIGEST_MAX_BYTES = 1 << 30  # above this a digest samples the file (ImageNet .beton files)
DIGEST_SAMPLE_BYTES = 16 << 20


def file_digest(path: Path) -> tuple[str, str]:
    """(sha256 hex digest, 32 characters; "sha256" or "sha256 of size + head, middle, tail").
    A whole ImageNet .beton (~100s of GB) would take minutes to hash: large files are sampled."""
    import hashlib

    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_MAX_BYTES:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()[:32], "sha256"
        h.update(str(size).encode())
        for offset in (0, size // 2, size - DIGEST_SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(DIGEST_SAMPLE_BYTES))
    return h.hexdigest()[:32], "sha256 of size + head, middle, tail (16 MiB each)"


class _Uploader:
    """Replays the pending JSONL file into an MLflow store; shared by Tracker and the CLI."""

    def __init__(self, uri: str, run_dir: Path):
        self.uri = uri
        self.run_dir = run_dir
        self.pending = run_dir / PENDING_FILE
        self.run_file = run_dir / RUN_ID_FILE
        self.run_id: str | None = self.run_file.read_text().strip() if self.run_file.is_file() else None
        self._client = None
        self._logged: dict[str, set[int]] = {}
        self._params: dict[str, str] = {}

    def read_records(self) -> list[dict]:
        if not self.pending.is_file():
            return []
        records = []
        for line in self.pending.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash mid-append
        return records

    def _connect(self, records: list[dict]) -> None:
        """Make sure the store, the experiment and the run exist; load what the run holds."""
        if self._client is not None:
            return
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = ensure_store(self.uri)
        if self.run_id is None:
            header = next((r for r in records if r["type"] == "run"), None)
            if header is None:
                raise TrackingUnavailable(f"no MLflow run id in {self.run_file} and no run record "
                                          f"in {self.pending}")
            tags = dict(header.get("tags") or {})
            if header.get("parent_run_id"):
                tags[MLFLOW_PARENT_RUN_ID] = header["parent_run_id"]
            exp_id = _experiment_id(client, self.uri, header["experiment"])
            # A kill between create_run and saving its id would leave the run behind and make
            # a second one next time: the header's key finds it instead.
            key = header.get("key")
            found = client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                       max_results=1) if key else []
            if key:
                tags[RUN_KEY_TAG] = key
            run = found[0] if found else client.create_run(exp_id, run_name=header.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
            atomic_write(self.run_file, self.run_id)
        try:
            run = client.get_run(self.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingUnavailable(f"run {self.run_id} (from {self.run_file}) is not in "
                                      f"this store") from None
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
        self._client = client

    def disconnect(self) -> None:
        self._client = None

    def upload(self) -> int:
        """Send every pending record, then empty the file. Returns the number of records."""
        records = self.read_records()
        if not records:
            return 0
        self._connect(records)
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        client, run_id = self._client, self.run_id
        metrics: list = []
        queued: set[tuple[str, int]] = set()  # this pass; `_logged` only holds what landed

        def send_metrics() -> None:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                batch = metrics[i:i + MAX_METRICS_PER_BATCH]
                client.log_batch(run_id, metrics=batch)
                for m in batch:
                    self._logged.setdefault(m.key, set()).add(m.step)
            metrics.clear()

        for rec in records:
            kind = rec["type"]
            if kind == "metrics":
                step = int(rec["step"])
                for key, value in rec["metrics"].items():
                    if step in self._logged.get(key, ()) or (key, step) in queued:
                        continue
                    queued.add((key, step))
                    metrics.append(Metric(key, float(value), int(rec["timestamp"]), step))
                continue
            send_metrics()  # keep the file's order around params, artifacts and status
            try:
                if kind == "params":
                    new = []
                    for key, value in rec["params"].items():
                        if key not in self._params:
                            new.append(Param(key, value))
                        elif self._params[key] != value:
                            warnings.warn(f"MLflow param {key!r} already {self._params[key]!r} "
                                          f"in run {run_id}; {value!r} not logged", stacklevel=2)
                    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
                        client.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])
                        self._params.update((p.key, p.value) for p in new[i:i + MAX_PARAMS_PER_BATCH])
                elif kind == "tags":
                    for key, value in rec["tags"].items():
                        client.set_tag(run_id, key, value)
                elif kind == "artifact":
                    path = Path(rec["path"])
                    if path.is_dir():
                        client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
                    elif path.is_file():
                        client.log_artifact(run_id, str(path), rec.get("artifact_path"))
                    else:
                        warnings.warn(f"artifact {path} no longer exists; not uploaded", stacklevel=2)
                elif kind == "dataset":
                    from mlflow.entities import Dataset, DatasetInput, InputTag

                    d = rec["dataset"]
                    client.log_inputs(run_id, datasets=[DatasetInput(
                        Dataset(d["name"], d["digest"], "local", d["source"], profile=json.dumps(d["profile"])),
                        tags=[InputTag("mlflow.data.context", d["context"])])])
                elif kind == "status":
                    if rec["status"] == "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                    else:
                        client.set_terminated(run_id, status=rec["status"])
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                warnings.warn(redact_text(f"MLflow rejected a {kind} record and it is dropped: {exc}"),
                              stacklevel=2)
        send_metrics()
        atomic_write(self.pending, "")
        return len(records)


class Tracker:
    """MLflow run of one training run; a no-op on ranks other than 0 or when disabled.

    run_id: continue this run (from the checkpoint); otherwise the id saved in run_dir, else
    a new run. parent_run_id nests the run under a tuning run.
    """

    def __init__(self, cfg: TrackingConfig, rank: int, run_dir: str | os.PathLike, *,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        self.cfg = cfg
        self.active = cfg.enabled and rank == 0
        uri = resolve_tracking_uri(cfg)
        self.tracking_uri = redact_text(uri)  # what messages show; only the uploader has the password
        self.run_dir = Path(run_dir)
        self._warned = False
        self._next_try = 0.0
        if not self.active:
            self._up = None
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._up = _Uploader(uri, self.run_dir)
        self._end_torn_line()
        if run_id is not None:
            self._up.run_id = run_id
            atomic_write(self._up.run_file, run_id)
        resuming = self._up.run_id is not None or any(
            r["type"] == "run" for r in self._up.read_records())
        if resuming:
            self._append({"type": "status", "status": "RUNNING", "tracking_uri": self.tracking_uri})
        else:
            self._append({"type": "run", "key": uuid.uuid4().hex, "experiment": cfg.experiment,
                          "run_name": cfg.run_name,
                          "parent_run_id": parent_run_id, "tags": tags or {},
                          "tracking_uri": self.tracking_uri})
        self.flush()

    @property
    def run_id(self) -> str | None:
        """None off rank 0, or while the run could not be created yet (store unreachable)."""
        return self._up.run_id if self._up is not None else None

    @property
    def online(self) -> bool:
        return self._up is not None and self._up._client is not None

    def pending_records(self) -> int:
        """Records kept in the pending file, not yet in the store (0 when inactive)."""
        return len(self._up.read_records()) if self._up is not None else 0

    def _end_torn_line(self) -> None:
        """A crash mid-append leaves a line without its newline; end it so the next record
        does not merge with it (the torn record itself is skipped when read)."""
        if self._up.pending.is_file() and self._up.pending.stat().st_size:
            with open(self._up.pending, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _append(self, record: dict) -> None:
        with open(self._up.pending, "a") as f:
            f.write(json.dumps(redact(record)) + "\n")  # what is stored never holds a password

    def _tick(self, urgent: bool) -> None:
        if (urgent and self.online) or time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> bool:
        """Try to upload what is pending now; True when nothing is left pending."""
        if not self.active:
            return True
        try:
            n = self._up.upload()
        except Exception as exc:  # unreachable, locked, refused: keep the records, go on
            self._up.disconnect()
            self._next_try = time.monotonic() + self.cfg.retry_every_s
            if not self._warned:
                self._warned = True
                warnings.warn(redact_text(
                    f"MLflow tracking at {self.tracking_uri} unavailable "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"training continues, records are kept in {self._up.pending} and retried every "
                    f"{self.cfg.retry_every_s:g} s (or: python -m launcher.tracking upload "
                    f"{self.run_dir})"), stacklevel=2)
            return False
        if self._warned and n:
            print(f"MLflow tracking at {self.tracking_uri} reachable again: {n} records uploaded",
                  file=sys.stderr)
            self._warned = False
        self._next_try = time.monotonic() + FLUSH_EVERY_S
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are strings in MLflow; None and numbers are logged as their str()."""
        if not self.active:
            return
        self._append({"type": "params", "params": {k: str(v) for k, v in params.items()}})
        self._tick(urgent=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self._append({"type": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                      "metrics": {k: float(v) for k, v in metrics.items()}})
        self._tick(urgent=False)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        self._append({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}})
        self._tick(urgent=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a directory; read when uploaded, so do not delete it right after."""
        if not self.active:
            return
        self._append({"type": "artifact", "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})
        self._tick(urgent=True)

    def log_dataset(self, path: str | os.PathLike, name: str, context: str, num_samples: int) -> None:
        """Record a data file the run reads as an MLflow dataset input (the lineage shown in the
        UI): its path, sample count and content digest."""
        if not self.active:
            return
        digest, how = file_digest(Path(path))
        self._append({"type": "dataset", "dataset": {
            "name": name, "digest": digest, "source": str(Path(path).resolve()), "context": context,
            "profile": {"num_samples": int(num_samples), "bytes": Path(path).stat().st_size, "digest": how}}})
        self._tick(urgent=True)

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str = "checkpoint") -> bool:
        """Upload a checkpoint file/dir if `tracking.log_checkpoint` allows its size, else tag
        its absolute path as `checkpoint_path`. Returns True if uploaded."""
        if not self.active:
            return False
        path = Path(path).resolve()
        size_mb = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                   if path.is_dir() else path.stat().st_size) / 2**20
        limit = self.cfg.log_checkpoint
        upload = limit if isinstance(limit, bool) else size_mb <= limit
        self.set_tags({"checkpoint_path": str(path), "checkpoint_mb": f"{size_mb:.1f}"})
        if upload:
            self.log_artifact(path, artifact_path)
        return upload

    def finish(self, status: str = "FINISHED") -> bool:
        """Mark the run FINISHED / KILLED (preempted) / FAILED and upload; True if all landed."""
        if not self.active:
            return True
        self._append({"type": "status", "status": status})
        return self.flush()

    def ui_command(self, port: int = 5000) -> str:
        """The command that shows this store in a browser (localhost only; no password in it)."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port {port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.tracking", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="send the records a run kept while MLflow was unreachable")
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", help="store to send to (default: the one the run used)")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    uploader = _Uploader("", run_dir)
    records = uploader.read_records()
    if not records:
        print(f"nothing pending in {run_dir / PENDING_FILE}")
        return 0
    recorded = next((r["tracking_uri"] for r in reversed(records) if r.get("tracking_uri")), None)
    if is_redacted(recorded) and not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        print(f"the run's store {recorded} needs credentials, which are never stored: pass "
              f"--tracking-uri URI (or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    uploader.uri = resolve_tracking_uri(TrackingConfig(
        tracking_uri=args.tracking_uri or (None if is_redacted(recorded) else recorded)))
    # A run still writing here uploads these records itself and empties the file after.
    try:
        with DirLock(run_dir, "MLflow upload", "RUN_DIR"):
            n = uploader.upload()
    except DirLocked as exc:
        print(f"upload refused: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(redact_text(f"upload to {uploader.uri} failed: {type(exc).__name__}: {exc}").splitlines()[0],
              file=sys.stderr)
        return 1
    print(f"uploaded {n} records to run {uploader.run_id} at {redact_text(uploader.uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
