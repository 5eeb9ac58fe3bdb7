"""Train a pruned SNN: search -> subnetwork -> fine-tune -> test + energy report (docs/METHOD.md §6).

    python -m launcher.train --config configs/demo.yaml [section.key=value ...]

The same module runs under torchrun, the deepspeed launcher and srun (launcher.distributed
reads whichever environment is present). Starting the same `checkpoint.run_dir` again resumes
from its `latest` checkpoint into the same MLflow run. SIGTERM / SIGUSR1 make every rank save
and exit with launcher.checkpoint.EXIT_TERMINATED / EXIT_REQUEUE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data_pipeline import DataError
from data_pipeline.loaders import make_loaders
from launcher.budget import BudgetController
from launcher.checkpoint import (CheckpointError, TrainState, find_resumable, load_checkpoint, safe_load,
                                 save_checkpoint)
from launcher.config import Config, ConfigError, config_yaml, flatten, load_config, save_config
from launcher.distributed import barrier, is_primary, reduce_scalars, setup_distributed
from launcher.ds_config import build_ds_config
from launcher.optimizer import build_optimizer, freeze, overwrite_params, set_lr
from launcher.preemption import EXIT_INTERRUPTED, PreemptionHandler
from launcher.run_lock import DirLock, DirLocked
from launcher.progress import Progress
from launcher.redact import redact_text
from launcher.mask_histogram import mask_histogram_png
from launcher.tracking import PENDING_FILE, Tracker, resolve_tracking_uri
from model import build_model
from model.atomic import atomic_torch_save
from model.energy_count import measure_energy
from model.energy_models import MODELS as ENERGY_MODELS
from model.energy_report import SAMPLE_MEANS, dense_energies
from model.masks import (MaskError, mask_logits, mask_mode, save_masks, set_beta, set_mask_mode, weight_layers,
                         weight_params)
from model.penalty import energy_penalty, penalty_terms
from model.schedules import beta_at, lr_at


class Diverged(RuntimeError):
    """The loss became inf or NaN: the run stops before that state reaches a checkpoint."""


class Preempted(Exception):
    """Raised after a signal-triggered checkpoint; carries the process exit code."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped by signal after saving a checkpoint (exit {exit_code})")
        self.exit_code = exit_code


@dataclass
class Ctx:
    """What the phases share; built once by `train`."""

    cfg: Config
    engine: object
    net: torch.nn.Module
    loaders: dict
    tracker: Tracker
    state: TrainState
    stop: PreemptionHandler
    device: torch.device
    dtype: torch.dtype
    steps_per_epoch: int
    reporter: Callable[[dict], None] | None
    budget: BudgetController | None
    progress: Progress
    dense_sops: float | None  # the dense reference's SOPs per sample, for the energy ratio
    dense_results: dict | None  # a finished dense run's results.json: its energy under each model
    last_sops: float | None = None  # the latest SOPs/sample measured, for the progress bar



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_demo_data(cfg: Config) -> None:
    """The demo set is bundled offline (Debian's Fashion-MNIST): written on first use, and
    again when an interrupted write left it incomplete (data_pipeline.images.ensure_demo)."""
    from data_pipeline.images import demo_missing, ensure_demo

    if cfg.data.dataset != "demo" or not demo_missing(cfg.data.data_dir):
        return
    if is_primary():
        ensure_demo(cfg.data.data_dir, seed=cfg.data.seed)
    barrier()


def dense_reference(ref: float | str | None, tracking_uri: str) -> tuple[float | None, dict | None]:
    """(the dense run's SOPs per sample, its results.json or None): the SOPs given as a number,
    read from a finished dense run's directory (results.json: its test-set report, which also
    carries its energy under each model), or from its MLflow run (the last value logged: its
    test-set energy report)."""
    if ref is None or isinstance(ref, (int, float)):
        return ref, None
    if Path(ref).is_dir():
        results = finished_results(Path(ref), "pruning.dense_reference")
        return float(results["sops_per_sample"]), results
    import mlflow

    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(ref)
    except Exception as exc:
        raise ConfigError(f"pruning.dense_reference: MLflow run {ref!r} not found at "
                          f"{redact_text(tracking_uri)} ({type(exc).__name__})") from None
    if "sops_per_sample" not in run.data.metrics:
        raise ConfigError(f"pruning.dense_reference: run {ref} has no sops_per_sample metric")
    return float(run.data.metrics["sops_per_sample"]), None


def load_best_model(path: Path, device: torch.device) -> dict:
    """The state dict in a run's best_model.pt, or a CheckpointError naming the file."""
    try:
        return safe_load(path, map_location=device)
    except Exception as exc:  # truncated, not a torch file, or objects weights_only refuses
        raise CheckpointError(f"{path} does not load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def finished_results(run_dir: Path, key: str) -> dict:
    """results.json of a finished run, or a ConfigError naming `key` and the directory."""
    path = run_dir / "results.json"
    if not path.is_file() or not (run_dir / "best_model.pt").is_file():
        raise ConfigError(f"{key}: {run_dir} holds no finished run (no results.json / best_model.pt); "
                          f"train that run first")
    return json.loads(path.read_text())


def start_from_magnitude(ctx: Ctx, dense_dir: Path) -> None:
    """The magnitude baseline (docs/METHOD.md §8): the dense run's selected weights, every
    weight logit set to |w|, so "kept iff logit > tau" is a global magnitude threshold; the
    budget calibration then picks tau so that the hard-mask SOPs land on the budget (the same
    calibration budget mode uses), and the subnetwork is hardened and fine-tuned as any other."""
    net = ctx.net
    dense = load_best_model(dense_dir / "best_model.pt", ctx.device)
    layers = [(n, m) for n, m in weight_layers(net) if m.logits is not None]
    own = net.state_dict()
    if set(dense) != set(own) - {f"{n}.logits" for n, _ in layers}:
        raise ConfigError(f"pruning.magnitude_from: {dense_dir}/best_model.pt is not a dense network of "
                          f"this model (another model, width or a pruned run?)")
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in dense.keys() - params.keys():
            own[name].copy_(dense[name])  # buffers: BatchNorm running statistics
    weights = [n for n in dense if n in params]
    overwrite_params([params[n] for n in weights] + [m.logits for _, m in layers],
                     [dense[n].to(params[n].dtype) for n in weights]
                     + [dense[f"{n}.weight"].abs().to(m.logits.dtype) for n, m in layers])
    harden_subnetwork(ctx)


@torch.no_grad()
def evaluate(ctx: Ctx, split: str, mode: str, limit: int | None = None) -> dict[str, float]:
    """Top-1/top-5 over this rank's shard (at most `limit` batches), summed over ranks (exact:
    shards are disjoint)."""
    net = ctx.net
    was_training = net.training
    net.eval()
    correct1 = correct5 = n = 0
    with mask_mode(net, mode):
        for i, (x, y) in enumerate(ctx.loaders[split]):
            if limit is not None and i >= limit:
                break
            scores = net.logits(net(x.to(ctx.device, ctx.dtype)))
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            y = y.to(top.device)
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            n += len(y)
    s = reduce_scalars({"c1": correct1, "c5": correct5, "n": n}, op="sum")
    net.train(was_training)
    return {"top1": s["c1"] / max(s["n"], 1), "top5": s["c5"] / max(s["n"], 1), "n": s["n"]}


def energy_on(ctx: Ctx, split: str, dense_sops: float | None, limit: int | None = None):
    """Energy report with hard masks on `split` (at most `limit` batches): each rank counts its
    shard, per-layer sums are reduced so every rank holds the report of the whole split."""
    report = measure_energy(ctx.net, ((x.to(ctx.device, ctx.dtype), y) for x, y in ctx.loaders[split]),
                            max_batches=limit, dense_reference_sops=dense_sops)
    fields, n = SAMPLE_MEANS, report.samples
    sums = reduce_scalars({"n": n, **{f"{i}.{f}": (getattr(row, f) or 0.0) * n
                                      for i, row in enumerate(report.layers) for f in fields}}, op="sum")
    for i, row in enumerate(report.layers):
        for f in fields:
            if getattr(row, f) is not None:
                setattr(row, f, sums[f"{i}.{f}"] / max(sums["n"], 1))
    report.samples = int(sums["n"])
    return report


def phase_epochs(cfg: Config, phase: str) -> int:
    """Epochs of `phase`; the dense baseline trains as long as a pruned run, in one phase."""
    p = cfg.pruning
    return {"search": p.search_epochs, "finetune": p.finetune_epochs,
            "dense": p.search_epochs + p.finetune_epochs}[phase]


def run_epoch(ctx: Ctx, phase: str, epoch: int, total_steps: int) -> float:
    """One epoch of `phase`, resuming after `state.batch_in_epoch` micro-batches if set.
    Returns the epoch's mean train_loss (task loss of the global batch)."""
    cfg, engine, net, state = ctx.cfg, ctx.engine, ctx.net, ctx.state
    search = phase == "search"
    loader = ctx.loaders["train"]
    loader.next_epoch = state.loader_epoch  # FFCV's order is seeded by epoch
    micro_per_epoch = ctx.steps_per_epoch * cfg.optim.grad_accum
    base_lr = cfg.optim.finetune_lr if phase == "finetune" else cfg.optim.lr
    terms = penalty_terms(net) if search else None
    net.train()
    # (sum of train_loss, steps) of this epoch: in the state, so a resumed epoch reports it whole.
    if state.batch_in_epoch == 0:
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    step_loss, bad_loss = 0.0, False
    bar = ctx.progress(phase, epoch, ctx.steps_per_epoch, state.batch_in_epoch // cfg.optim.grad_accum)
    for i, (x, y) in enumerate(loader if state.batch_in_epoch < micro_per_epoch else ()):
        if i < state.batch_in_epoch:
            continue  # trained on before the interruption; read anyway to keep the data stream
        if i >= micro_per_epoch:
            break
        phase_step = state.phase_step
        lr = lr_at(phase_step, total_steps, base_lr, cfg.optim.schedule)
        set_lr(engine.optimizer, "weight", lr)
        metrics = {"lr": lr}
        if search:
            # the reference schedules both optimizers (docs/METHOD.md §6); frozen after the search
            mask_lr = lr_at(phase_step, total_steps, cfg.optim.mask_lr, cfg.optim.schedule)
            set_lr(engine.optimizer, "mask", mask_lr)
            metrics["mask_lr"] = mask_lr
            beta = beta_at(state.search_step, total_steps, cfg.pruning.beta_0, cfg.pruning.beta_T)
            set_beta(net, beta)
            metrics["beta"] = beta
        out = engine(x.to(ctx.device, ctx.dtype))
        task = net.loss(out.float(), y.to(ctx.device))
        loss = task
        if search:
            lw, ln = ctx.budget.lambdas() if ctx.budget else (cfg.pruning.lambda_w, cfg.pruning.lambda_n)
            penalty = energy_penalty(net, lw, ln, terms)
            loss = task + penalty
            metrics.update(penalty=penalty.item(), lambda_w=lw, lambda_n=ln)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        state.batch_in_epoch = i + 1
        step_loss += task.item() / cfg.optim.grad_accum
        bad_loss = bad_loss or not math.isfinite(loss.item())
        if not boundary:
            continue
        state.step += 1
        sync_buffers(net)
        if search:
            state.search_step += 1
            if ctx.budget and state.search_step % ctx.budget.every == 0:
                progress = state.search_step / max(total_steps, 1)
                cost = ctx.budget.observe(net, x.to(ctx.device, ctx.dtype), progress)
                if ctx.budget.energy_model is None:
                    metrics["budget_sops"] = ctx.last_sops = cost
                else:  # pJ per sample under pruning.energy_model
                    metrics["budget_energy_pj"] = cost
                metrics["budget_target"] = ctx.budget.target(progress)
        # The loss of the global batch: mean over micro-batches and ranks (one small all-reduce).
        reduced = reduce_scalars({"loss": step_loss, "bad": float(bad_loss)})
        if reduced["bad"] > 0 or not math.isfinite(reduced["loss"]):
            raise Diverged(f"the loss is not finite at step {state.step} ({phase} epoch {epoch + 1}); stopped "
                           f"without saving this state, the checkpoints in {cfg.checkpoint.run_dir} are kept "
                           f"(lower optim.lr or the lambdas, or resume from the last one)")
        metrics["train_loss"] = reduced["loss"]
        step_loss, bad_loss = 0.0, False
        state.epoch_loss_sum += metrics["train_loss"]
        state.epoch_loss_steps += 1
        ctx.tracker.log_metrics(metrics, step=state.step)
        bar.update(loss=metrics["train_loss"], lr=lr, **{k: metrics[k] for k in ("beta",) if k in metrics},
                   **({"sops": ctx.last_sops} if ctx.last_sops is not None else {}))
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
            save(ctx)
        if ctx.stop.should_stop():
            save(ctx)
            raise Preempted(ctx.stop.exit_code)
    bar.close()
    return state.epoch_loss_sum / max(state.epoch_loss_steps, 1)


def sync_buffers(net: torch.nn.Module) -> None:
    """Average the floating buffers (BatchNorm running statistics) over ranks, in place.

    DeepSpeed keeps parameters equal on every rank, not buffers, which each rank updates from
    its own batch: ranks would evaluate different models and a checkpoint (rank 0's module)
    would not continue exactly. Averaged every step, they follow the global batch."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    bufs = [b for b in net.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


def save(ctx: Ctx, tag: str | None = None) -> None:
    # The run id can appear late (store unreachable at start); rank 0's state is the one saved.
    ctx.state.mlflow_run_id = ctx.tracker.run_id or ctx.state.mlflow_run_id
    if ctx.budget:
        ctx.state.budget = ctx.budget.state_dict()
    save_checkpoint(ctx.engine, ctx.cfg.checkpoint.run_dir, ctx.state, ctx.cfg,
                    keep_last=ctx.cfg.checkpoint.keep_last, tag=tag)


def end_of_epoch(ctx: Ctx, phase: str, epoch: int, train_loss: float) -> dict:
    """Validation (soft and hard masks), structure, SOPs and energy under every named model
    (what a sweep on an energy budget ranks on); logged and returned."""
    cfg = ctx.cfg
    pruning = cfg.pruning.enabled
    metrics = {"epoch_train_loss": train_loss}
    limit = cfg.eval_batches_limit
    if pruning and phase == "search":
        metrics["val_top1"] = evaluate(ctx, "val", "soft", limit)["top1"]
        metrics["val_top1_hard"] = evaluate(ctx, "val", "hard", limit)["top1"]
    else:
        metrics["val_top1"] = metrics["val_top1_hard"] = evaluate(ctx, "val", "hard" if pruning else "off",
                                                                  limit)["top1"]
    report = energy_on(ctx, "val", None, limit)
    metrics.update(weight_keep=report.weight_keep, neuron_keep=report.neuron_keep,
                   connectivity=report.connectivity, sops_per_sample=report.sops_per_sample,
                   **{f"energy_pj_per_sample/{m}": report.model_energy_pj(m) for m in ENERGY_MODELS})
    ctx.last_sops = report.sops_per_sample
    ctx.tracker.log_metrics(metrics, step=ctx.state.step)
    if is_primary():
        # The energy under the configured model only: four of them make the line unreadable.
        shown = {k: v for k, v in metrics.items()
                 if not k.startswith("energy_pj_per_sample/") or k.endswith(f"/{cfg.pruning.energy_model}")}
        print(f"[{phase} {epoch + 1}] " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)
    return metrics


def run_phase(ctx: Ctx, phase: str) -> None:
    cfg, state = ctx.cfg, ctx.state
    epochs = phase_epochs(cfg, phase)
    total_steps = epochs * ctx.steps_per_epoch
    best_path = Path(cfg.checkpoint.run_dir) / "best_model.pt"
    while state.epoch < epochs:
        train_loss = run_epoch(ctx, phase, state.epoch, total_steps)
        if ctx.budget and phase == "finetune":
            calibrate_budget(ctx)
        metrics = end_of_epoch(ctx, phase, state.epoch, train_loss)
        if phase != "search" and (state.best_val_top1 is None or metrics["val_top1"] > state.best_val_top1):
            state.best_val_top1, state.best_epoch = metrics["val_top1"], state.epoch
            if is_primary():
                atomic_torch_save(ctx.net.state_dict(), best_path, fsync=True)
        epoch, state.epoch, state.batch_in_epoch = state.epoch, state.epoch + 1, 0
        state.loader_epoch += 1
        save(ctx)
        # After the save: a trial that dies here resumes past this epoch, reported once.
        if ctx.reporter is not None:
            ctx.reporter({"phase": phase, "epoch": epoch, "step": state.step, **metrics})


def calibrate_budget(ctx: Ctx, rounds: int = 3) -> None:
    """Budget mode: put the hard-mask SOPs (or energy) on the budget (launcher.budget.calibrate), measured on
    the first validation batches, those that also select the checkpoint: at most 8 of them, because
    a calibration measures up to tens of times, each a whole forward pass with counting hooks (demo:
    calibrated on 512 images, the selected network was 2.0 % under its budget on the 10,000 test
    images; on 1,024, 1.1 %).

    A calibration that moves the kept set leaves BatchNorm's running statistics those of the network
    before it, and the checkpoint is validated (and may be selected) right after: the statistics
    are re-estimated on the same batches (`reestimate_batchnorm`), which moves the firing and so the
    SOPs, then calibrated again, until a calibration keeps the set (at most `rounds`). Demo network,
    15 % of its kept masks removed at random: validation top-1 0.39 with the old statistics, 0.63
    re-estimated (docs/METHOD.md §4)."""
    n = min(ctx.cfg.eval_batches_limit or 8, 8)
    # Cloned: FFCV refills a batch's buffer a few batches later (data_pipeline.loaders).
    batches = [(x.to(ctx.device, ctx.dtype).clone(),) for x, _ in itertools.islice(ctx.loaders["val"], n)]
    rounds_found = []
    for _ in range(rounds):
        rounds_found.append(ctx.budget.calibrate(ctx.net, batches))
        if rounds_found[-1]["budget_tau"] == 0.0:
            break
        reestimate_batchnorm(ctx.net, batches)
    n_rounds = len(rounds_found)
    found = {**rounds_found[-1], **{k: v for k, v in rounds_found[0].items() if k.endswith("_before")},
             "budget_calibration_iters": sum(f["budget_calibration_iters"] for f in rounds_found),
             "budget_rounds": float(n_rounds)}
    ctx.tracker.log_metrics(found, step=ctx.state.step)
    if is_primary():
        unit = "sops" if ctx.budget.energy_model is None else "energy_pj"
        name = "SOPs/sample" if unit == "sops" else f"pJ/sample ({ctx.budget.energy_model})"
        print(f"[budget] {name} {found[f'budget_{unit}_before']:.4g} -> {found[f'budget_{unit}_after']:.4g} "
              f"(budget {ctx.budget.budget:.4g}, last logit shift {found['budget_tau']:.3g}, "
              f"{n_rounds} round{'s' if n_rounds > 1 else ''})", flush=True)


@torch.no_grad()
def reestimate_batchnorm(net: torch.nn.Module, batches: list) -> None:
    """BatchNorm running statistics as the plain mean over `batches` (labels unused) of the network as
    it is now; only the BatchNorm layers run in training mode. Averaged over ranks after."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for (x,) in batches:
            net(x)
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    sync_buffers(net)


def harden_subnetwork(ctx: Ctx) -> None:
    """End of search: masks hardened and frozen, weight LR reset, optimizer state kept."""
    state = ctx.state
    set_mask_mode(ctx.net, "hard")
    freeze(ctx.engine.optimizer, "mask")
    state.phase, state.epoch, state.batch_in_epoch = "finetune", 0, 0
    if ctx.budget:
        calibrate_budget(ctx)
    write_mask_artifacts(ctx)
    save(ctx, tag="subnetwork")
    save(ctx)


def write_mask_artifacts(ctx: Ctx) -> None:
    """masks.spm and the mask histograms of the network in `ctx.net`, locally and in MLflow.
    Written at hardening and again for the selected network: in budget mode the calibration
    moves the kept set after every fine-tune epoch, and the file a user downloads must be the
    reported network's."""
    run_dir = Path(ctx.cfg.checkpoint.run_dir)
    if is_primary():
        save_masks(ctx.net, run_dir / "masks.spm", ctx.cfg.model.name)
        mask_histogram_png(ctx.net, run_dir / "mask_histograms.png")
        ctx.tracker.log_artifact(run_dir / "masks.spm")
        ctx.tracker.log_artifact(run_dir / "mask_histograms.png")


# Keys that change how a run is executed or logged, not what it computes: free on resume.
RESUME_FREE = ("data.data_dir", "data.num_workers", "data.os_cache", "checkpoint.run_dir",
               "checkpoint.every_steps", "checkpoint.keep_last", "tracking.")
# Keys a resumed run can never take new values for: the parameters' shapes, the data order or
# the resume position (micro-batches into the epoch) depend on them.
RESUME_FIXED = ("data.dataset", "data.batch_size", "data.order", "data.seed", "data.image_size", "model.",
                "pruning.enabled", "pruning.prune_weights", "pruning.prune_neurons", "optim.grad_accum",
                "optim.weight_optimizer", "deepspeed.", "seed", "steps_per_epoch_limit")


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def check_resume_config(cfg: Config, ckpt, allow_changed: tuple[str, ...]) -> dict[str, tuple]:
    """{key: (checkpoint's value, new value)} of the accepted changes; a ConfigError naming the
    keys when the new config differs from the checkpoint's in any other key.

    Resuming with, say, another lambda would silently mix two experiments under one MLflow run
    (its params keep the old values); another batch size would reuse the resume position with
    another meaning. Keys in RESUME_FREE may change; others only when named in `allow_changed`
    (`--allow-changed` on the command line), and RESUME_FIXED keys never.
    """
    new = flatten(cfg)
    # Defaults first: a checkpoint of an older version lacks the keys added since.
    old = {**flatten(Config()), **flatten(ckpt.config)}
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and not _matches(k, RESUME_FREE)}
    unknown = [k for k in allow_changed if k not in new]
    if unknown:
        raise ConfigError(f"--allow-changed: unknown config key {unknown[0]!r}")
    fixed = [k for k in diff if _matches(k, RESUME_FIXED)]
    refused = [k for k in diff if k in fixed or k not in allow_changed]
    if refused:
        what = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in refused)
        hint = (f"{', '.join(fixed)} cannot change on resume" if fixed else
                f"or pass --allow-changed {','.join(refused)} to resume with the new values")
        raise ConfigError(f"resuming {ckpt.path}: the config differs from the checkpoint's in {what}; "
                          f"start a new checkpoint.run_dir ({hint})")
    if diff and is_primary():
        print("resuming with changed config: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()),
              flush=True)
    return diff


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and prove it writable: one line now, not a traceback at the first checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"checkpoint.run_dir: {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"checkpoint.run_dir: cannot write to {run_dir} ({exc.strerror or exc})") from None


def print_finished(run_dir: Path) -> dict:
    """A finished run started again: its results, printed and returned, nothing trained."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
        line = (f"test_top1={results['test_top1']:.4g} sops_per_sample={results['sops_per_sample']:.4g} "
                f"(test split, {int(results['test_samples'])} samples)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{run_dir} finished, but its results.json is unreadable "
                              f"({type(exc).__name__}: {exc}); delete the run dir to train again") from None
    if is_primary():
        print(f"{run_dir} has finished already: {line}; results in {run_dir / 'results.json'}", flush=True)
    return results


def final_report(ctx: Ctx) -> dict:
    """Best fine-tune epoch (chosen on validation) -> one test evaluation + energy report."""
    cfg, run_dir = ctx.cfg, Path(ctx.cfg.checkpoint.run_dir)
    best_path = run_dir / "best_model.pt"
    barrier()
    if best_path.exists():
        best = load_best_model(best_path, ctx.device)
        try:
            ctx.net.load_state_dict(best)
        except RuntimeError:  # torch lists every key: too long for one line
            raise CheckpointError(f"{best_path} does not fit this run's network (other keys or shapes)") from None
    elif is_primary():  # no fine-tuning to select from: the reported model is the last one
        atomic_torch_save(ctx.net.state_dict(), best_path, fsync=True)
    mode = "hard" if cfg.pruning.enabled else "off"
    if cfg.pruning.enabled:
        write_mask_artifacts(ctx)
    # Always the whole test split: `eval_batches_limit` caps only the validation passes.
    test = evaluate(ctx, "test", mode)
    report = energy_on(ctx, "test", ctx.dense_sops)
    if ctx.dense_results is not None:
        report.dense_reference_pj = dense_energies(ctx.dense_results)
    results = {"test_top1": test["top1"], "test_top5": test["top5"], "test_samples": test["n"],
               "best_val_top1": ctx.state.best_val_top1, "best_epoch": ctx.state.best_epoch,
               **report.metrics()}
    if is_primary():
        report.to_json(run_dir / "energy_report.json")
        report.plot(run_dir / "energy_per_layer.png")
        print(report.table(), flush=True)
        # One step past training: the last epoch already logged its validation
        # sops_per_sample etc. at state.step, and a (key, step) pair is only stored once.
        ctx.tracker.log_metrics({k: v for k, v in results.items() if isinstance(v, (int, float))},
                                step=ctx.state.step + 1)
        ctx.tracker.log_artifact(run_dir / "energy_report.json")
        ctx.tracker.log_artifact(run_dir / "energy_per_layer.png")
        ctx.tracker.log_checkpoint(best_path)
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        if ctx.tracker.active:
            print(f"browse the run: {ctx.tracker.ui_command()}", flush=True)
    ctx.state.phase = "done"
    save(ctx)
    return results


def train(cfg: Config, reporter: Callable[[dict], None] | None = None, local_rank: int | None = None,
          parent_run_id: str | None = None, allow_changed: tuple[str, ...] = ()) -> dict:
    """The whole learning process; returns the final metrics (tuning/ calls this directly,
    `reporter` receiving every epoch's metrics, `parent_run_id` nesting the MLflow run).
    `allow_changed`: config keys a resumed run may take new values for (check_resume_config)."""
    # Installed first: a SIGUSR1/SIGTERM during the set-up (engine, loaders: tens of seconds)
    # is acted on at the first step instead of killing the process without a checkpoint.
    # Signal handlers can only be set from the main thread (not in a Ray Tune worker thread).
    # Ctrl-C saves too; a second Ctrl-C stops at once.
    signals = ((signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
               if threading.current_thread() is threading.main_thread() else ())
    with PreemptionHandler(signals) as stop, ExitStack() as held:
        return _train(cfg, stop, held, reporter, local_rank, parent_run_id, tuple(allow_changed))


def _train(cfg: Config, stop: PreemptionHandler, held: ExitStack, reporter: Callable[[dict], None] | None,
           local_rank: int | None, parent_run_id: str | None, allow_changed: tuple[str, ...]) -> dict:
    import deepspeed

    info = setup_distributed(local_rank)
    seed_everything(cfg.seed)
    p, run_dir = cfg.pruning, Path(cfg.checkpoint.run_dir)
    # Everything that can fail on a wrong input fails here, before anything is written into the
    # run directory or an MLflow run is created.
    dense_sops, dense_results = dense_reference(p.dense_reference, resolve_tracking_uri(cfg.tracking))
    if p.magnitude_from is not None:
        finished_results(Path(p.magnitude_from), "pruning.magnitude_from")
        load_best_model(Path(p.magnitude_from) / "best_model.pt", torch.device("cpu"))
    ensure_demo_data(cfg)
    loaders = make_loaders(cfg.data.dataset, cfg.data.data_dir, batch_size=cfg.data.batch_size,
                           num_workers=cfg.data.num_workers, order=cfg.data.order, os_cache=cfg.data.os_cache,
                           distributed=info.world_size > 1, device=info.device, seed=cfg.data.seed,
                           image_size=cfg.data.image_size)
    for split in ("train", "val", "test"):
        if split not in loaders:
            raise DataError(f"{cfg.data.data_dir}: {split}.beton is missing")
    batches = len(loaders["train"])
    micro = min(batches, (cfg.steps_per_epoch_limit or batches) * cfg.optim.grad_accum)
    steps_per_epoch = micro // cfg.optim.grad_accum
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data.data_dir}/train.beton gives {batches} batches per rank: fewer than "
                        f"grad_accum={cfg.optim.grad_accum}; lower data.batch_size")
    try:
        net = build_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T,
                          width=cfg.model.width, input_size=cfg.model.input_size,
                          weight_masks=p.enabled and p.prune_weights, neuron_masks=p.enabled and p.prune_neurons)
    except ValueError as exc:  # a width that leaves no channels, an input size the net cannot take
        raise ConfigError(f"model: {exc}") from None
    ckpt, changed = find_resumable(run_dir), {}
    if ckpt is not None:
        changed = check_resume_config(cfg, ckpt, allow_changed)
    finished = ckpt is not None and ckpt.state.phase == "done"
    if is_primary():
        prepare_run_dir(run_dir)
        # One writer per run dir (two lose each other's MLflow records); held until train() ends.
        held.enter_context(DirLock(run_dir, "training run", "checkpoint.run_dir"))
        if not finished:
            save_config(cfg, run_dir / "config.yaml")
    if finished:
        # A kill after the final save can leave the MLflow run RUNNING, records still pending.
        finish_tracking(Tracker(cfg.tracking, info.rank, run_dir, run_id=ckpt.state.mlflow_run_id,
                                parent_run_id=parent_run_id), "FINISHED")
        return print_finished(run_dir)
    if not p.enabled:
        set_mask_mode(net, "off")
    optimizer = build_optimizer(mask_logits(net), weight_params(net), cfg)
    ds_config = build_ds_config(cfg, info.world_size, info.on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    first = "search" if p.search_epochs > 0 else "finetune"
    state = TrainState(phase=first if p.enabled else "dense")
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt)
        if is_primary():
            print(f"resuming from {ckpt.path} (step {state.step}, {state.phase} epoch {state.epoch + 1})",
                  flush=True)
    tracker = Tracker(cfg.tracking, info.rank, run_dir, run_id=state.mlflow_run_id,
                      parent_run_id=parent_run_id)
    if ckpt is not None and changed:
        # MLflow params cannot change: the new values are logged beside the old, named by step
        # (MLflow keys allow "/", not "@").
        tracker.log_params({f"{k}/step{state.step}": v for k, (_, v) in changed.items()})
    if ckpt is None:
        tracker.log_params(flatten(cfg))
        for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
            tracker.log_dataset(Path(cfg.data.data_dir) / f"{split}.beton", f"{cfg.data.dataset}/{split}",
                                context, loaders[split].reader.num_samples)
    budget = None
    if p.enabled and (p.sop_budget is not None or p.energy_budget_pj is not None):
        on_sops = p.sop_budget is not None  # else an energy budget under p.energy_model
        budget = BudgetController(p.sop_budget if on_sops else p.energy_budget_pj, p.lambda_w, p.lambda_n,
                                  energy_model=None if on_sops else p.energy_model)
        if state.budget is not None:
            budget.load_state_dict(state.budget)
    if is_primary():
        from model.structure import connectivity

        print(f"resolved config:\n{config_yaml(cfg)}", flush=True)
        print(f"world_size={info.world_size} backend={info.backend} device={info.device} dtype={dtype}\n"
              f"global_batch={ds_config['train_batch_size']} (micro {cfg.data.batch_size} x accum "
              f"{cfg.optim.grad_accum} x world {info.world_size}) steps/epoch={steps_per_epoch} "
              f"train samples/rank={loaders['train'].num_samples}\n"
              f"model={cfg.model.name} width={cfg.model.width} T={cfg.model.T} "
              f"dense connections/step={connectivity(net).dense_total:,.0f}", flush=True)

    ctx = Ctx(cfg, engine, net, loaders, tracker, state, stop, info.device, dtype,
              steps_per_epoch, reporter, budget, Progress(enabled=is_primary()), dense_sops, dense_results)
    try:
        if p.magnitude_from is not None and ckpt is None:
            start_from_magnitude(ctx, Path(p.magnitude_from))
        if state.phase == "search":
            set_mask_mode(net, "soft")
            run_phase(ctx, "search")
            harden_subnetwork(ctx)
        if state.phase == "finetune":
            set_mask_mode(net, "hard")
            freeze(engine.optimizer, "mask")
            run_phase(ctx, "finetune")
        elif state.phase == "dense":
            run_phase(ctx, "dense")
        results = final_report(ctx)
    except (Preempted, KeyboardInterrupt):
        finish_tracking(tracker, "KILLED")
        raise
    except Exception:
        finish_tracking(tracker, "FAILED")
        raise
    finish_tracking(tracker, "FINISHED")
    return results


def finish_tracking(tracker: Tracker, status: str) -> None:
    """Close the MLflow run; when the store stayed unreachable, the last lines say what is kept."""
    if tracker.finish(status) or not is_primary():
        return
    print(f"MLflow at {tracker.tracking_uri} stayed unreachable: {tracker.pending_records()} records are "
          f"pending in {tracker.run_dir / PENDING_FILE}; send them with: "
          f"python -m launcher.tracking upload {tracker.run_dir}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher")
    parser.add_argument("--allow-changed", default="", metavar="KEY,KEY",
                        help="config keys a resumed run may take new values for (e.g. pruning.finetune_epochs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, local_rank=args.local_rank,
              allow_changed=tuple(k.strip() for k in args.allow_changed.split(",") if k.strip()))
    except Preempted as p:
        print(str(p), file=sys.stderr, flush=True)
        return p.exit_code
    except (ConfigError, DataError, CheckpointError, MaskError, DirLocked) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped without a checkpoint; starting the same command again resumes "
              "from the last one", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, run dir removed or made unwritable mid-run
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
