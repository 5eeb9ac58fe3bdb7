"""Shared pieces of the launcher tests: a tiny real demo data set, the tiny config, and
running `python -m launcher.train` (or a launcher around it) as a subprocess.

Training always runs in a subprocess with a clean environment: `setup_distributed` exports
RANK/MASTER_PORT and starts a process group, which must not leak into the pytest process
(other tests start their own ranks).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "test_tiny.yaml"
# Real Fashion-MNIST images, few of them: 512 train (32 batches of 16; 16 per rank with two
# ranks), 128 val, 128 test.
N_TRAIN, N_VAL, N_TEST = 512, 128, 128
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE",
             "MLFLOW_TRACKING_URI", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_NTASKS")

_tiny_data: dict[Path, Path] = {}


def tiny_data(base: Path) -> Path:
    """`base/tiny_demo` holding train/val/test.beton in the demo format (written once per session)."""
    base = Path(base)
    if base in _tiny_data:
        return _tiny_data[base]
    from ffcv.fields import IntField, RGBImageField

    from data_pipeline.images import ArrayImages, read_fashion_mnist, to_rgb32
    from data_pipeline.splits import carve_val, write_beton

    out = base / "tiny_demo"
    (train_x, train_y), (test_x, test_y) = read_fashion_mnist()
    train = ArrayImages(to_rgb32(train_x[:N_TRAIN + N_VAL]), train_y[:N_TRAIN + N_VAL])
    test = ArrayImages(to_rgb32(test_x[:N_TEST]), test_y[:N_TEST])
    train_idx, val_idx = carve_val(len(train), N_VAL, seed=0)
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    for split, data, indices in (("train", train, train_idx), ("val", train, val_idx), ("test", test, None)):
        write_beton(out / f"{split}.beton", data, fields, indices=indices, num_workers=1)
    _tiny_data[base] = out
    return out


def overrides(data_dir: Path, run_dir: Path, store: str | None, *extra: str) -> list[str]:
    """`key=value` arguments putting a tiny run's data, run dir and MLflow store in place."""
    track = [f"tracking.tracking_uri={store}"] if store else ["tracking.enabled=false"]
    return [f"data.data_dir={data_dir}", f"checkpoint.run_dir={run_dir}", *track, *extra]


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


@functools.cache
def _store_template() -> Path:
    """One migrated, empty SQLite MLflow store per session (removed at exit)."""
    from launcher.tracking import ensure_store

    root = Path(tempfile.mkdtemp(prefix="spikeprune-mlflow-template-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    ensure_store(sqlite_uri(root / "mlruns.db"))
    return root / "mlruns.db"


def new_store(path: Path) -> str:
    """The URI of a new, empty SQLite MLflow store at `path`: a copy of `_store_template`. A
    store MLflow creates itself runs every schema migration first (2-4 s here, in each test
    that starts one); the copy is the same real store, already migrated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(_store_template(), path)
    return sqlite_uri(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus any rank / master / tracking variables, plus `extra`; CPU only
    (the tests are about CPU/gloo runs, also on a machine with a GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), **extra)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "--config", str(TINY_CONFIG), *args]


def run_train(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m launcher.train --config configs/test_tiny.yaml ARGS` to a successful end."""
    proc = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@dataclass
class FinishedRun:
    run_dir: Path
    store: str
    args: list[str]
    stdout: str
    stderr: str


_reference: dict[Path, FinishedRun] = {}


def reference_run(base: Path) -> FinishedRun:
    """configs/test_tiny.yaml trained to the end with an MLflow SQLite store, once per session
    (under `base/reference`): the uninterrupted run the other tests compare against."""
    base = Path(base)
    if base not in _reference:
        root = base / "reference"
        store = new_store(root / "mlruns.db")
        args = overrides(tiny_data(base), root / "run", store)
        proc = run_train(args)
        _reference[base] = FinishedRun(root / "run", store, args, proc.stdout, proc.stderr)
    return _reference[base]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module's state_dict (weights, BN statistics and mask logits) in a checkpoint."""
    from launcher.checkpoint import safe_load

    return safe_load(Path(tag_dir) / "mp_rank_00_model_states.pt")["module"]


def masks_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hard masks (logit > 0) that a state dict implies."""
    return {k: v > 0 for k, v in state.items() if k.endswith("logits")}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-key max |a - b| over floating tensors (keys must match)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a
            if a[k].is_floating_point() and a[k].numel()}


# --------------------------------------------------------------------------- rank probe
#
# `python tests/helpers_train.py --config ... key=value` (also under torchrun / the deepspeed
# launcher) runs launcher.train.main unchanged and only observes it: every rank writes
# `<run_dir>/probe_rank<R>.json` with, per training micro-batch, a digest of its input and
# its loss, and per epoch end a digest of the module's parameters, buffers and hard masks.

def _probe(argv: list[str]) -> int:
    import json

    import torch.distributed as dist

    import launcher.train as lt

    record: dict = {"batches": [], "epochs": []}
    real_run_phase, real_end_of_epoch = lt.run_phase, lt.end_of_epoch

    def run_phase(ctx, phase):
        if not getattr(ctx.net, "_probed", False):
            ctx.net._probed = True
            real_forward = ctx.net.forward

            def forward(x):
                if ctx.net.training:
                    h = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                    record["batches"].append({"step": ctx.state.step, "x": h})
                return real_forward(x)

            real_loss = ctx.net.loss

            def loss(out, y):
                value = real_loss(out, y)
                record["batches"][-1]["loss"] = value.item()
                return value

            ctx.net.forward, ctx.net.loss = forward, loss
            record["run_dir"] = ctx.cfg.checkpoint.run_dir
        return real_run_phase(ctx, phase)

    def end_of_epoch(ctx, phase, epoch, train_loss):
        state = ctx.net.state_dict()
        params = {k: v for k, v in ctx.net.named_parameters()}
        buffers = {k: v for k, v in state.items() if k not in params}
        record["epochs"].append({"phase": phase, "epoch": epoch, "step": ctx.state.step,
                                 "train_loss": train_loss, "state": state_digest(state),
                                 "params": state_digest(params),
                                 "buffers": state_digest(buffers),
                                 "masks": state_digest(masks_of(state))})
        return real_end_of_epoch(ctx, phase, epoch, train_loss)

    lt.run_phase, lt.end_of_epoch = run_phase, end_of_epoch
    code = lt.main(argv)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if "run_dir" in record:
        Path(record["run_dir"], f"probe_rank{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1:]))
