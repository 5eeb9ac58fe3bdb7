"""Crash-safe DeepSpeed checkpoints and resume discovery (signals: launcher/preemption.py).

Layout under `<run_dir>/checkpoints/`:

    step000001200/                   one checkpoint ("tag"); never modified in place
        mp_rank_00_model_states.pt   DeepSpeed (module, stage-0 optimizer, our client state)
        zero_pp_rank_*_optim_states.pt   DeepSpeed, ZeRO 1/2 only (one per rank)
        rng_rank00000.pt             ours: every rank's RNG states
        COMPLETE.json                ours, written last: step, TrainState, config, file sizes
                                     and sha256 digests
    latest                           ours: the tag name (DeepSpeed's format), replaced atomically

A crash at any moment leaves a usable checkpoint: DeepSpeed writes into `<tag>.partial/`,
every rank fsyncs, rank 0 writes COMPLETE.json, renames the directory to `<tag>` and only
then switches `latest` (temp file + os.replace). DeepSpeed's own `latest` is written in
place, so it is turned off (save_latest=False). Weights holding NaN or inf are never saved.

What resume trusts (docs/RELIABILITY.md): the rename is the commit. Discovery considers
`<tag>` directories with a COMPLETE.json, newest step first, and uses the first whose marker
has its keys, whose files all have the recorded sizes and sha256 digests (checkpoints from
before the digests: sizes only) and whose .pt files load; each damaged one is reported in one
line and skipped. `<tag>.partial` is never trusted, marker or not: a kill between the marker
and the rename leaves one, and the step is simply trained again. `<tag>.old` is the previous
version of a tag that was being re-saved (moved aside just before the new one is renamed in):
trusted only after `<tag>` itself, and the next save puts it back under its name. `latest` is
a hint (ties, messages); a missing one or one naming a missing tag is reported, not obeyed.
Discovery writes nothing (exporters read running runs); the writer (rank 0, which holds the
run-dir lock, launcher/run_lock.py) tidies up at its next save.

Nothing here unpickles arbitrary objects: DeepSpeed's loader is switched to
torch.load(weights_only=True), with DeepSpeed's own few checkpoint classes allow-listed.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from launcher.redact import redact
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


def _read_marker(tag_dir: Path) -> dict:
    """COMPLETE.json of `tag_dir`, checked for the keys resume needs; CheckpointError if not.

    The marker is written atomically with fsync, so one that does not parse or lacks a key
    was damaged afterwards: reported, never silently taken for a half-written save."""
    path = tag_dir / MARKER
    try:
        marker = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete (no readable {MARKER}: "
                              f"{exc.strerror})") from None
    except ValueError:
        raise CheckpointError(f"checkpoint marker {path} is damaged (not JSON)") from None
    problem = None
    if not isinstance(marker, dict):
        problem = "not a mapping"
    elif missing := [k for k in ("state", "config", "world_size", "files") if k not in marker]:
        problem = f"missing {', '.join(missing)}"
    elif not isinstance(marker["state"], dict) or not isinstance(marker["state"].get("step"), int):
        problem = "state has no step"
    elif not isinstance(marker["files"], dict) or not all(
            isinstance(v, int) for v in marker["files"].values()):
        problem = "files is not a map of sizes"
    elif unknown := set(marker["state"]) - {f.name for f in dataclasses.fields(TrainState)}:
        problem = f"state has unknown fields {sorted(unknown)}"
    if problem:
        raise CheckpointError(f"checkpoint marker {path} is damaged ({problem})")
    return marker


def _read_latest(root: Path) -> str | None:
    try:
        tag = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return tag or None


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _sha256(path: Path) -> str:
    # About 1 GB/s with SHA instructions: 0.57 s for a 565 MiB file that took 2.6 s to write
    # and fsync (docs/RELIABILITY.md).
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoint(tag_dir: Path, marker: dict) -> Checkpoint:
    return Checkpoint(path=tag_dir, tag=tag_dir.name, state=TrainState(**marker["state"]),
                      config=marker["config"], world_size=int(marker["world_size"]))


def open_checkpoint(tag_dir: str | os.PathLike) -> Checkpoint:
    """Validate one checkpoint directory; raise CheckpointError saying what is wrong.

    Complete = COMPLETE.json with its keys, every file it lists present with the recorded
    size and sha256 digest (when recorded: older checkpoints have sizes only), and every .pt
    file loadable with weights_only=True (memory-mapped: cheap).
    """
    tag_dir = Path(tag_dir)
    marker = _read_marker(tag_dir)
    digests = marker.get("sha256") or {}
    for name, size in marker["files"].items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is missing {name}")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is truncated or altered "
                                  f"({f.stat().st_size} bytes, {size} expected)")
        if name in digests and _sha256(f) != digests[name]:
            raise CheckpointError(f"checkpoint file {f} is damaged (its sha256 differs from the "
                                  f"one in {MARKER}; same size)")
    for name in marker["files"]:
        if name.endswith(".pt"):
            try:
                safe_load(tag_dir / name, mmap=True)
            except Exception as exc:  # any unpickling/zip error means unusable
                raise CheckpointError(f"checkpoint file {tag_dir / name} does not load: "
                                      f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    return _checkpoint(tag_dir, marker)


# Tag directories rank 0 found damaged in this process: they never count toward keep_last.
_damaged: set[Path] = set()


def _candidates(root: Path, latest: str | None) -> list[Path]:
    """Committed checkpoint directories, the one to try first first."""
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        if not d.is_dir() or d.name.endswith(".partial") or not (d / MARKER).exists():
            continue  # a save or a removal cut short: never committed
        base = d.name.removesuffix(".old")
        try:
            step = _read_marker(d)["state"]["step"]
        except CheckpointError:  # damaged: tried in its place by its name, reported then
            m = _AUTO_TAG.match(base)
            step = int(m.group(1)) if m else -1
        try:
            written = (d / MARKER).stat().st_mtime
        except OSError:  # removed meanwhile by the run that writes here
            continue
        # Newest step first; a tag before its .old version; at equal steps `latest`'s target,
        # then the last written.
        found.append((step, d.name == base, base == latest, written, d.name))
    return [root / name for *_, name in sorted(found, reverse=True)]


def _find_resumable_local(root: Path) -> tuple[str | None, list[str], str | None]:
    """(tag of the newest usable checkpoint, one-line notes for the user, why to refuse when
    the tag is None although the directory held checkpoints)."""
    latest = _read_latest(root)
    notes: list[str] = []
    problems: list[str] = []
    for d in _candidates(root, latest):
        try:
            open_checkpoint(d)
        except CheckpointError as exc:
            _damaged.add(d)
            problems.append(str(exc))
            notes.append(f"skipping damaged checkpoint: {exc}")
            continue
        base = d.name.removesuffix(".old")
        if d.name != base:
            notes.append(f"checkpoint {root / base} was being replaced when the run stopped: "
                         f"resuming from its previous version {d}")
        if latest is None:
            notes.append(f"{root / LATEST} is missing or empty: resuming from the newest verified "
                         f"checkpoint {d}")
        elif latest is not None and latest != base and not (root / latest / MARKER).exists():
            notes.append(f"{root / LATEST} names {latest!r}, which is not a checkpoint in {root}: "
                         f"resuming from the newest verified checkpoint {d}")
        return d.name, notes, None
    if problems:
        return None, notes, f"no usable checkpoint in {root}: {problems[0]}"
    if latest is not None:
        return None, notes, (f"{root / LATEST} names {latest!r} but {root} holds no complete "
                             f"checkpoint; move {root} away to start over")
    return None, notes, None


def find_resumable(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint to resume `run_dir` from, or None for a fresh start.

    Half-written saves are ignored silently; a complete checkpoint that is damaged is warned
    about (one line) and skipped; if every complete checkpoint is damaged, or `latest` names
    a checkpoint that is not there and none is, this raises CheckpointError rather than
    silently starting over. Rank 0 decides and every rank gets the same answer.
    """
    root = Path(run_dir) / "checkpoints"
    rank, world = _rank_world()
    decision: list[Any] = [None, [], None]
    if rank == 0:
        decision = list(_find_resumable_local(root))
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    tag, notes, refusal = decision
    if rank == 0:
        for note in notes:
            warnings.warn(note, stacklevel=2)
    if refusal is not None:
        raise CheckpointError(refusal)
    if tag is None:
        return None
    return _checkpoint(root / tag, _read_marker(root / tag))


def _remove_tag(tag_dir: Path) -> None:
    # Marker first: a crash halfway through the removal leaves an incomplete (ignored) dir.
    (tag_dir / MARKER).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _usable(tag_dir: Path) -> bool:
    """Cheap check for retention (marker and sizes; the digests were checked at discovery)."""
    if tag_dir in _damaged:
        return False
    try:
        marker = _read_marker(tag_dir)
    except CheckpointError:
        return False
    return all((tag_dir / n).is_file() and (tag_dir / n).stat().st_size == size
               for n, size in marker["files"].items())


def _prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` usable step-tags (`current` included); drop the rest.

    Damaged checkpoints never count, so they never push out the newest good one. `<tag>.old`
    whose `<tag>` is gone (a re-save cut short) is first put back under its name; other
    leftovers (`.partial`, `.old`) of earlier saves are removed. Tags not named step<N>
    (e.g. "subnetwork") are kept: the loop pins them on purpose.
    """
    for d in list(root.iterdir()):
        base = root / d.name.removesuffix(".old")
        if d.is_dir() and d.name.endswith(".old") and base.name != current and not base.exists() \
                and _usable(d):
            os.rename(d, base)
    auto = []
    for d in root.iterdir():
        if not d.is_dir() or d.name == current:
            continue
        m = _AUTO_TAG.match(d.name)
        if d.name.endswith((".partial", ".old")):
            _remove_tag(d)
        elif m and _usable(d):
            auto.append((int(m.group(1)), d))
        elif m:
            _remove_tag(d)
    keep = max(0, keep_last - (1 if _AUTO_TAG.match(current) else 0))
    for _, d in sorted(auto, reverse=True)[keep:]:
        _remove_tag(d)


def _first_non_finite(module: torch.nn.Module) -> str | None:
    """Name of the first parameter (then buffer) holding NaN or inf, else None."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _write_failed(exc: BaseException, root: Path, partial: Path, rank: int) -> CheckpointError:
    if rank == 0:
        _remove_tag(partial)  # gives back the space a full disk needs
    return CheckpointError(f"cannot write checkpoint {partial}: {type(exc).__name__}: {exc}".splitlines()[0]
                           + f" (disk full or a file-size limit?); the checkpoints in {root} are kept")


# --------------------------------------------------------------------------- save / load

def save_checkpoint(engine, run_dir: str | os.PathLike, state: TrainState, cfg: Config, *,
                    keep_last: int, tag: str | None = None) -> Path:
    """Save `engine` + `state` as `<run_dir>/checkpoints/<tag>` crash-safely; all ranks call.

    DeepSpeed writes into `<tag>.partial`; once every rank's files are fsynced, rank 0 adds
    COMPLETE.json (sizes and sha256 digests), renames the directory to `<tag>` (an existing
    one is moved aside first, so a re-saved tag is replaced, never half-overwritten) and
    switches `latest`. tag defaults to step<state.step>; other names (e.g. "subnetwork") are
    never pruned by keep_last. Returns the tag directory.

    Refused with CheckpointError (one line; the checkpoints on disk stay as they are) when a
    parameter or buffer holds NaN/inf, or when a write fails (disk full, a file-size limit:
    CPython ignores SIGXFSZ, so the write fails instead of killing the process).
    """
    root = Path(run_dir) / "checkpoints"
    tag = tag or f"step{state.step:09d}"
    final, partial, old = root / tag, root / f"{tag}.partial", root / f"{tag}.old"
    rank, world = _rank_world()
    # Parameters and buffers are equal on every rank (buffers: launcher.train.sync_buffers),
    # so every rank refuses together.
    bad = _first_non_finite(engine.module)
    if bad is not None:
        raise CheckpointError(f"not saving checkpoint {tag} at step {state.step}: {bad} holds NaN or "
                              f"inf; the checkpoints in {root} are kept as they were")

    _barrier()  # nobody is still reading a directory rank 0 is about to remove
    if rank == 0 and partial.exists():
        _remove_tag(partial)
    _barrier()
    _use_weights_only_loader(engine)
    config = redact(to_dict(cfg))  # as stored in the client state and COMPLETE.json
    client = {CLIENT_KEY: {"train_state": dataclasses.asdict(state), "config": config}}
    try:
        engine.save_checkpoint(str(root), tag=partial.name, client_state=client, save_latest=False)
        atomic_torch_save(capture_rng(), partial / _rng_file(rank), fsync=True)
        # Each rank makes what it sees durable (its own shards included) before the marker;
        # a dot file is another rank's write in flight (its rename may come any moment), and
        # that rank makes it durable itself.
        for f in partial.iterdir():
            if f.is_file() and not f.name.startswith("."):
                fsync_path(f)
    except (OSError, RuntimeError) as exc:
        raise _write_failed(exc, root, partial, rank) from None
    _barrier()
    if rank == 0:
        names = [f.name for f in sorted(partial.iterdir())
                 if f.is_file() and f.name != MARKER and not f.name.startswith(".")]
        marker = {"tag": tag, "world_size": world, "saved_at": time.time(),
                  "state": dataclasses.asdict(state), "config": config,
                  "files": {n: (partial / n).stat().st_size for n in names},
                  "sha256": {n: _sha256(partial / n) for n in names}}
        try:
            atomic_write(partial / MARKER, json.dumps(marker, indent=1), fsync=True)
        except OSError as exc:
            raise _write_failed(exc, root, partial, rank) from None
        if final.exists():
            if old.exists():
                _remove_tag(old)
            os.rename(final, old)
        os.rename(partial, final)
        fsync_path(root)
        atomic_write(root / LATEST, tag, fsync=True)
        if old.exists():
            _remove_tag(old)
        _damaged.discard(final)
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
