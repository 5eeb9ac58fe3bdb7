"""Crash-safe DeepSpeed checkpoints and resume discovery (signals: launcher/preemption.py).

Layout under `<run_dir>/checkpoints/`:

    step000001200/                   one checkpoint ("tag"); never modified in place
        mp_rank_00_model_states.pt   DeepSpeed (module, stage-0 optimizer, our client state)
        zero_pp_rank_*_optim_states.pt   DeepSpeed, ZeRO 1/2 only (one per rank)
        rng_rank00000.pt             ours: every rank's RNG states
        COMPLETE.json                ours, written last: step, TrainState, config, file sizes
    latest                           ours: the tag name (DeepSpeed's format), replaced atomically

A crash at any moment leaves a usable checkpoint: DeepSpeed writes into `<tag>.partial/`,
every rank fsyncs, rank 0 writes COMPLETE.json, renames the directory to `<tag>` and only
then switches `latest` (temp file + os.replace). DeepSpeed's own `latest` is written in
place, so it is turned off (save_latest=False). Resume discovery trusts only directories
with COMPLETE.json whose files still have the recorded sizes and load; a damaged one is
reported and skipped in favour of the previous complete one.

Nothing here unpickles arbitrary objects: DeepSpeed's loader is switched to
torch.load(weights_only=True), with DeepSpeed's own few checkpoint classes allow-listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from launcher.config import Config, to_dict
from model.atomic import atomic_torch_save, atomic_write, fsync_path

MARKER = "COMPLETE.json"
LATEST = "latest"
CLIENT_KEY = "spikeprune"
_AUTO_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file."""


@dataclass
class TrainState:
    """Where the training loop is; enough to continue exactly (stored with every checkpoint).

    step: optimizer steps done since the start of the run (all phases).
    phase / epoch: the phase in progress and the index of its epoch in progress ("dense": a
      baseline with pruning off, one phase as long as search + fine-tune).
    batch_in_epoch: micro-batches of that epoch already consumed (resume skips them).
    search_step: optimizer steps done in the search phase, i.e. the beta position; the
      fine-tune (or dense) phase's own step is `step - search_step`.
    loader_epoch: epochs the train loader has started (FFCV seeds its order by it).
    epoch_loss_sum / epoch_loss_steps: train loss of the epoch in progress, so a resumed
      epoch reports its whole mean.
    budget: the budget controller's state in budget mode, else None.
    """

    step: int = 0
    phase: Literal["search", "finetune", "dense", "done"] = "search"
    epoch: int = 0
    batch_in_epoch: int = 0
    search_step: int = 0
    loader_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    best_val_top1: float | None = None
    best_epoch: int | None = None
    mlflow_run_id: str | None = None
    budget: dict[str, Any] | None = None

    @property
    def phase_step(self) -> int:
        """Optimizer steps done in the phase in progress (the LR schedule's position)."""
        return self.search_step if self.phase == "search" else self.step - self.search_step


@dataclass
class Checkpoint:
    """A complete, validated checkpoint found on disk."""

    path: Path  # the tag directory
    tag: str
    state: TrainState
    config: dict  # the run's config (launcher.config.to_dict form)
    world_size: int


def register_safe_globals() -> None:
    """Allow-list the DeepSpeed classes that ZeRO optimizer shards pickle (docs/STACK.md)."""
    torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's classes allowed; the only loader we use."""
    register_safe_globals()
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (it passes False)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def _use_weights_only_loader(engine) -> None:
    # Swap the class of DeepSpeed's own instance: keeps its settings (serialization format).
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine


# --------------------------------------------------------------------------- RNG

def capture_rng() -> dict:
    """RNG states of python, numpy and torch (CPU + CUDA) in weights_only-loadable types."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- helpers

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _read_marker(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _read_latest(root: Path) -> str | None:
    try:
        tag = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return tag or None


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def open_checkpoint(tag_dir: str | os.PathLike) -> Checkpoint:
    """Validate one checkpoint directory; raise CheckpointError saying what is wrong.

    Complete = COMPLETE.json present, every file it lists present with the recorded size,
    and every .pt file loadable with weights_only=True (memory-mapped: cheap).
    """
    tag_dir = Path(tag_dir)
    marker = _read_marker(tag_dir)
    if marker is None:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete (no readable {MARKER})")
    for name, size in marker["files"].items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is missing {name}")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is truncated or altered "
                                  f"({f.stat().st_size} bytes, {size} expected)")
    for name in marker["files"]:
        if name.endswith(".pt"):
            try:
                safe_load(tag_dir / name, mmap=True)
            except Exception as exc:  # any unpickling/zip error means unusable
                raise CheckpointError(f"checkpoint file {tag_dir / name} does not load: "
                                      f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    return Checkpoint(path=tag_dir, tag=tag_dir.name, state=TrainState(**marker["state"]),
                      config=marker["config"], world_size=int(marker["world_size"]))


def _find_resumable_local(root: Path) -> tuple[str | None, list[str]]:
    """(tag of the newest usable checkpoint, problems with newer complete ones)."""
    latest = _read_latest(root)
    complete = []
    for d in root.iterdir() if root.is_dir() else ():
        marker = _read_marker(d) if d.is_dir() else None
        if marker is not None:
            # Newest step first; at equal steps `latest`'s target, then the last written.
            complete.append((int(marker["state"]["step"]), d.name == latest,
                             (d / MARKER).stat().st_mtime, d.name))
    problems = []
    for *_, tag in sorted(complete, reverse=True):
        try:
            open_checkpoint(root / tag)
            return tag, problems
        except CheckpointError as exc:
            problems.append(str(exc))
    return None, problems


def find_resumable(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint to resume `run_dir` from, or None for a fresh start.

    Half-written saves are ignored silently; a complete checkpoint that is damaged is warned
    about and skipped; if every complete checkpoint is damaged this raises CheckpointError
    rather than silently starting over. Rank 0 decides and every rank gets the same answer.
    """
    root = Path(run_dir) / "checkpoints"
    rank, world = _rank_world()
    decision: list[Any] = [None, []]
    if rank == 0:
        decision = list(_find_resumable_local(root))
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    tag, problems = decision
    if tag is None and problems:
        raise CheckpointError(f"no usable checkpoint in {root}: {problems[0]}")
    for p in problems:
        if rank == 0:
            warnings.warn(f"skipping damaged checkpoint: {p}", stacklevel=2)
    if tag is None:
        return None
    marker = _read_marker(root / tag)
    return Checkpoint(path=root / tag, tag=tag, state=TrainState(**marker["state"]),
                      config=marker["config"], world_size=int(marker["world_size"]))


def _remove_tag(tag_dir: Path) -> None:
    # Marker first: a crash halfway through the removal leaves an incomplete (ignored) dir.
    (tag_dir / MARKER).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` step-tags; drop leftovers (`.partial`, `.old`) of earlier saves.

    Tags not named step<N> (e.g. "subnetwork") are kept: the loop pins them on purpose.
    """
    auto = []
    for d in root.iterdir():
        if not d.is_dir() or d.name == current:
            continue
        m = _AUTO_TAG.match(d.name)
        if d.name.endswith((".partial", ".old")):
            _remove_tag(d)
        elif m and _read_marker(d) is not None:
            auto.append((int(m.group(1)), d))
        elif m:
            _remove_tag(d)
    keep = max(0, keep_last - (1 if _AUTO_TAG.match(current) else 0))
    for _, d in sorted(auto, reverse=True)[keep:]:
        _remove_tag(d)


# --------------------------------------------------------------------------- save / load

def save_checkpoint(engine, run_dir: str | os.PathLike, state: TrainState, cfg: Config, *,
                    keep_last: int, tag: str | None = None) -> Path:
    """Save `engine` + `state` as `<run_dir>/checkpoints/<tag>` crash-safely; all ranks call.

    DeepSpeed writes into `<tag>.partial`; once every rank's files are fsynced, rank 0 adds
    COMPLETE.json, renames the directory to `<tag>` (an existing one is moved aside first,
    so a re-saved tag is replaced, never half-overwritten) and switches `latest`.
    tag defaults to step<state.step>; other names (e.g. "subnetwork") are never pruned by
    keep_last. Returns the tag directory.
    """
    root = Path(run_dir) / "checkpoints"
    tag = tag or f"step{state.step:09d}"
    final, partial, old = root / tag, root / f"{tag}.partial", root / f"{tag}.old"
    rank, world = _rank_world()

    _barrier()  # nobody is still reading a directory rank 0 is about to remove
    if rank == 0 and partial.exists():
        _remove_tag(partial)
    _barrier()
    _use_weights_only_loader(engine)
    client = {CLIENT_KEY: {"train_state": dataclasses.asdict(state), "config": to_dict(cfg)}}
    engine.save_checkpoint(str(root), tag=partial.name, client_state=client, save_latest=False)
    atomic_torch_save(capture_rng(), partial / _rng_file(rank), fsync=True)
    # Each rank makes what it sees durable (its own shards included) before the marker.
    for f in partial.iterdir():
        if f.is_file():
            fsync_path(f)
    _barrier()
    if rank == 0:
        files = {f.name: f.stat().st_size for f in sorted(partial.iterdir())
                 if f.is_file() and f.name != MARKER and not f.name.startswith(".")}
        marker = {"tag": tag, "world_size": world, "saved_at": time.time(),
                  "state": dataclasses.asdict(state), "config": to_dict(cfg), "files": files}
        atomic_write(partial / MARKER, json.dumps(marker, indent=1), fsync=True)
        if final.exists():
            if old.exists():
                _remove_tag(old)
            os.rename(final, old)
        os.rename(partial, final)
        fsync_path(root)
        atomic_write(root / LATEST, tag, fsync=True)
        if old.exists():
            _remove_tag(old)
        _prune(root, keep_last, current=tag)
    _barrier()
    return final


def load_checkpoint(engine, ckpt: Checkpoint, *, load_optimizer_states: bool = True) -> TrainState:
    """Restore `engine` (module, optimizer, ZeRO shards) and this rank's RNG from `ckpt`.

    All ranks call. The engine must be built from the same parameter lists as when saving.
    RNG states are restored only when the world size is unchanged (otherwise there is no
    matching per-rank state and exact continuation is impossible anyway).
    """
    _use_weights_only_loader(engine)
    try:
        load_path, client = engine.load_checkpoint(
            str(ckpt.path.parent), tag=ckpt.tag, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=False)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {ckpt.path}: {type(exc).__name__}: "
                              f"{exc}".splitlines()[0]) from exc
    if load_path is None or not client or CLIENT_KEY not in client:
        raise CheckpointError(f"cannot load checkpoint {ckpt.path}: DeepSpeed found no model states")
    rank, world = _rank_world()
    rng_file = ckpt.path / _rng_file(rank)
    if world == ckpt.world_size and rng_file.is_file():
        restore_rng(safe_load(rng_file))
    elif rank == 0:
        warnings.warn(f"checkpoint {ckpt.path} was saved by {ckpt.world_size} ranks, resuming "
                      f"with {world}: RNG states not restored", stacklevel=2)
    return TrainState(**client[CLIENT_KEY]["train_state"])
