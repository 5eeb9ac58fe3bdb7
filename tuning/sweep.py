"""Search the mask-penalty coefficients against SOP or energy budgets with Ray Tune (docs/METHOD.md §4).

    python tuning/sweep.py --config configs/sweep_demo.yaml [--address auto|HOST:PORT] [key=value ...]
    python -m tuning.sweep  (the same)

Each trial is one `launcher.train.train(cfg)` call (the CLI's code path) on the training config
plus the trial's searched values; it reports every epoch to Tune, and its result is the
fine-tuned hardened network's validation accuracy and its cost: SOPs per sample, or with
`energy_model` pJ per sample under that hardware model (docs/ENERGY.md). The search is
multi-objective (Optuna TPE: maximise val_top1, minimise the cost, with "cost over the largest
budget" as an Optuna constraint), so one sweep answers every budget: for each budget the most
accurate finished trial within it. ASHA stops trials that trail in hard-mask validation
accuracy during the search phase, ranking a trial over the largest budget below every trial
within it (`rung_score`); stopped trials never made a finished network and are kept out of
the front and the answers.

Everything lives in `storage_path/name/` (the sweep dir): Tune's experiment state, one folder
per trial (`trial_<id>/run` is the launcher's run dir, with its checkpoints), and the outputs
`results.txt`, `pareto.png`, `summary.json`, `best_configs/`. Starting the same command again
continues an interrupted sweep: finished trials are kept, unfinished and errored ones resume
from their last checkpoint. MLflow: one parent run per sweep, one nested run per trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

if __name__ == "__main__" and __package__ in (None, ""):
    # `python tuning/sweep.py`: make the repo importable, then run the module proper so that
    # the trainable is pickled by reference to `tuning.sweep`, not by value from __main__.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tuning.sweep import main

    sys.exit(main())

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from launcher.config import Config, ConfigError, load_config
from launcher.redact import redact, redact_text
from launcher.run_lock import DirLock, DirLocked
from launcher.tracking import Tracker, ensure_store, resolve_tracking_uri
from model.atomic import atomic_write
from tuning import pareto
from tuning.pareto import TrialOutcome
from tuning.sweep_config import (SweepConfig, base_train_config, load_sweep_config,
                                 sweep_config_yaml, to_dict)

EXIT_INTERRUPTED = 130
CONNECT_TIMEOUT_S = 5.0
SOCKET_PATH_MAX = 107  # AF_UNIX; Ray puts sockets at <temp dir>/session_<date>_<pid>/sockets/...
# The run-dependent settings a restarted sweep may change; everything else is fixed by the
# saved Tune experiment, so a different value would be silently ignored: refuse instead.
RESTART_MAY_CHANGE = ("address", "local_cpus")
# What Tune unpickles from the sweep dir when it restores (the tuner, the searcher, the trials in
# the experiment state): whoever can write these runs code in the next restart.
TUNE_STATE = ("tuner.pkl", "experiment_state-*.json", "searcher-state-*.pkl", "basic-variant-state-*.json")
# Ray's "no cluster" switch (read at import, so its constant is set too): a local Ray binds
# its servers to the node's outward address unless it is off (docs/STACK.md).
RAY_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class SweepError(RuntimeError):
    """A problem that stops the sweep; the message is one line for the user."""


# --------------------------------------------------------------------------- inside a trial

@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its sampled values (sent once through Ray)."""

    train_config: str  # absolute path
    train_overrides: tuple[str, ...]  # with absolute data dir and tracking URI
    sweep_dir: str
    parent_run_id: str | None
    # The epoch metric the budgets count (sweep_config.BudgetAxis.metric), reported as "cost".
    cost_metric: str
    # Cost per sample above which a trial fits no budget (None in budget mode, where the cost
    # is only calibrated onto the budget at the end of the search).
    cost_limit: float | None


class EpochLog:
    """Every epoch a trial reported, kept in its run dir: a trial restarted after a failure
    still knows its earlier fine-tune epochs when it picks the finished network's numbers."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "tune_epochs.json"
        self.epochs: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, metrics: dict) -> None:
        # Keyed by (phase, epoch): an epoch re-run after a restart replaces its first report.
        self.epochs[f"{metrics['phase']}/{metrics['epoch']}"] = metrics
        atomic_write(self.path, json.dumps(self.epochs))

    def finished_network(self) -> dict:
        """The fine-tune (or dense) epoch the launcher keeps (first best val_top1; it saves
        best_model.pt on a strict improvement), else the last epoch reported."""
        finetune = sorted((m for m in self.epochs.values() if m["phase"] in ("finetune", "dense")),
                          key=lambda m: m["epoch"])
        if finetune:
            return max(finetune, key=lambda m: m["val_top1"])  # max() keeps the first of ties
        return max(self.epochs.values(), key=lambda m: m["step"])


def rung_score(val_top1_hard: float, cost: float, cost_limit: float | None) -> float:
    """What ASHA compares at a rung: hard-mask accuracy for a trial within the largest budget
    (cost: SOPs or pJ per sample); below all of those (negative) for one over it, the further
    over the lower (Deb's feasibility rule, so no weight to tune). Accuracy alone would stop
    the heavily pruned trials, the only candidates for small budgets, in favour of accurate
    ones over budget."""
    if cost_limit is None or cost <= cost_limit:
        return val_top1_hard
    return -cost / cost_limit


def _one_rank_environment() -> None:
    """A trial is one rank: say so before the launcher reads the environment. Ray workers
    inherit the environment of `ray start`, which under SLURM is an srun step's; the launcher
    would then take SLURM_PROCID for the rank and derive MASTER_PORT from the job id, the
    same port for every trial on a node. Without MASTER_PORT it picks a free port."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def _numbers(metrics: dict) -> dict:
    """The plain numbers of an epoch's metrics for Tune (the per-model energies, "a/b" keys that
    Tune would read as nested, reach it as "cost" when budgeted; MLflow has them all)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" not in k}


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune trainable: one training run, reported to Tune after every epoch.

    `config` holds the sampled values keyed by training config key. The run dir is fixed by
    the trial id (inside the trial's folder), so a retried or restored trial finds the
    launcher checkpoint and `train` resumes from it; the Tune checkpoint of each epoch records
    which run dir and epoch it stands for.
    """
    from launcher.train import train  # torch, DeepSpeed: only in the trial's process

    _one_rank_environment()
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup.sweep_dir) / trial_dirname_for(trial_id) / "run"
    overrides = [*setup.train_overrides, *(f"{k}={v}" for k, v in sorted(config.items())),
                 f"checkpoint.run_dir={run_dir}", f"tracking.run_name=trial_{trial_id}"]
    cfg = load_config(setup.train_config, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = EpochLog(run_dir)

    def report_epoch(metrics: dict) -> None:
        log.add(metrics)
        cost = metrics[setup.cost_metric]
        result = {**_numbers(metrics), "phase": metrics["phase"], "cost": cost,
                  "rung_score": rung_score(metrics["val_top1_hard"], cost, setup.cost_limit)}
        if metrics["phase"] == "search":
            result["search_epoch"] = metrics["epoch"] + 1  # ASHA's clock; absent when fine-tuning
        with tempfile.TemporaryDirectory() as d:
            pointer = {"run_dir": str(run_dir), **{k: metrics[k] for k in ("phase", "epoch", "step")}}
            (Path(d) / "run_dir.json").write_text(json.dumps(pointer))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    results = train(cfg, reporter=report_epoch, parent_run_id=setup.parent_run_id)
    best = log.finished_network()
    tune.report({
        "finished": True, "phase": "done",
        # The objectives: the fine-tuned hardened net on the validation split.
        "val_top1": best["val_top1"], "val_top1_hard": best["val_top1_hard"],
        "sops_per_sample": best["sops_per_sample"], "cost": best[setup.cost_metric],
        "rung_score": rung_score(best["val_top1_hard"], best[setup.cost_metric], setup.cost_limit),
        # The launcher's final report (test split) of the same network.
        "test_top1": results["test_top1"], "test_top5": results["test_top5"],
        "test_sops_per_sample": results["sops_per_sample"], "test_cost": results[setup.cost_metric],
        **{k: results[k] for k in ("connectivity", "energy_pj_per_sample", "weight_keep", "neuron_keep")
           if results.get(k) is not None},
    })


def trial_dirname_for(trial_id: str) -> str:
    return f"trial_{trial_id}"


def trial_dirname(trial) -> str:
    """Tune's folder name of a trial (stable across restores; Tune pickles this function)."""
    return trial_dirname_for(trial.trial_id)


# --------------------------------------------------------------------------- search set-up

class FinishedOnlyOptuna(OptunaSearch):
    """OptunaSearch that tells Optuna only about finished networks.

    Ray hands a trial the scheduler stopped early to `on_trial_complete` with its last
    (half-searched, soft-mask) result, which Optuna would store as COMPLETE: here it goes in
    as PRUNED instead. A finished trial gets the Optuna constraint `cost - largest budget <= 0`
    (cost: SOPs or pJ per sample), so TPE learns where the feasible region is.
    """

    def __init__(self, *args, max_cost: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_cost = max_cost

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and not error:
            if result is not None and result.get("finished"):
                self._ot_trials[trial_id].set_constraint(
                    "over_budget", float(result["cost"]) - self.max_cost)
            else:
                result = None  # OptunaSearch then tells Optuna PRUNED
        super().on_trial_complete(trial_id, result, error)


def param_space(cfg: SweepConfig) -> dict:
    """Tune's search space keyed by training config key."""
    space = {key: tune.loguniform(lo, hi) for key, (lo, hi) in cfg.search.ranges().items()}
    if cfg.budget_mode:
        space[cfg.axis.train_key] = tune.choice(list(cfg.budgets))
    return space


def first_points(cfg: SweepConfig) -> list[dict]:
    """Budget mode: one trial per budget first (other knobs at the geometric middle of their
    ranges), so that every budget is tried whatever the sampler prefers later."""
    if not cfg.budget_mode:
        return []
    middle = {key: math.sqrt(lo * hi) for key, (lo, hi) in cfg.search.ranges().items()}
    return [{**middle, cfg.axis.train_key: b} for b in cfg.budgets][: cfg.num_trials]


def search_algorithm(cfg: SweepConfig):
    if cfg.search_alg == "random":
        return None  # Tune's BasicVariantGenerator: independent samples of the space
    import optuna

    return FinishedOnlyOptuna(
        metric=["val_top1", "cost"], mode=["max", "min"],
        points_to_evaluate=first_points(cfg) or None,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        max_cost=cfg.cost_limit)


def scheduler(cfg: SweepConfig, train_cfg: Config):
    if cfg.scheduler.name == "none":
        return None
    # Rungs only at search epochs: `search_epoch` is absent from fine-tune results, and with
    # stop_last_trials=False a trial that survives the last rung runs to the end.
    return ASHAScheduler(time_attr="search_epoch", metric="rung_score", mode="max",
                         max_t=train_cfg.pruning.search_epochs,
                         grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor, stop_last_trials=False)


# --------------------------------------------------------------------------- Ray

def ray_temp_dir(sweep_dir: Path) -> str:
    """Ray's session files under the sweep dir, unless its sockets' paths would be too long."""
    wanted = sweep_dir / "ray"
    if len(str(wanted)) + len("/session_2026-01-01_00-00-00_000000_0000000/sockets/plasma_store") < SOCKET_PATH_MAX:
        return str(wanted)
    digest = hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:10]
    short = Path(tempfile.gettempdir()) / f"ray_{os.getuid()}_{digest}"
    print(f"Ray's socket paths under {sweep_dir} would be too long: its session files go to {short}",
          flush=True)
    return str(short)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not minutes, when no Ray cluster listens at HOST:PORT (ray.init
    itself retries for minutes). `auto` is left to ray.init, which fails at once."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SweepError(f"no Ray cluster reachable at {address} ({reason} after at most "
                         f"{timeout_s:g} s): start one with `ray start --head --port={port}` "
                         f"(see slurm/ray_tune.sh), or leave --address out for a local Ray") from None


def connect_ray(address: str | None, local_cpus: int | None, out_dir: Path) -> None:
    """A local Ray (session files under `out_dir`) when `address` is None, else the cluster's."""
    if address is None:
        with _loopback_only():
            ray.init(num_cpus=local_cpus, _temp_dir=ray_temp_dir(out_dir), include_dashboard=False)
        return
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise SweepError(f"cannot connect to the Ray cluster at {address}: "
                         f"{str(exc).splitlines()[0]}") from None


@contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray on 127.0.0.1 only, unless the user set RAY_CLUSTER_VAR. Ray's processes
    inherit the variable at start; the driver's copy is restored after (a later join of a
    real cluster needs the node's own address)."""
    from ray._private import ray_constants

    if RAY_CLUSTER_VAR in os.environ:
        yield
        return
    os.environ[RAY_CLUSTER_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        del os.environ[RAY_CLUSTER_VAR]
        ray_constants.ENABLE_RAY_CLUSTER = True


def check_state_trusted(out_dir: Path) -> None:
    """Restoring runs whatever Tune's pickled state says (TUNE_STATE): refuse state that another
    user wrote or could have changed, in one line (docs/RELIABILITY.md)."""
    uid = os.getuid()
    # Per file, not the folder: a file another user replaced or added is theirs, whatever
    # the folder's mode (a group-writable sweep dir under umask 002 is common on clusters).
    for path in sorted(p for pattern in TUNE_STATE for p in out_dir.glob(pattern)):
        st = path.lstat()
        problem = ("is a symbolic link" if path.is_symlink() else
                   f"is owned by uid {st.st_uid}, not you ({uid})" if st.st_uid != uid else
                   "is writable by group or others" if st.st_mode & 0o022 else None)
        if problem:
            raise SweepError(f"{path} {problem}: restoring the sweep would unpickle (run) Tune's state "
                             f"from it; not restored (if you trust it, chown it or chmod go-w it; else "
                             f"start over with another name=)")


@contextmanager
def held_out_dir(kind: str, out_dir: Path, saved: Path, config_yaml: str) -> Iterator[bool]:
    """The start of a sweep or a comparison in `out_dir`; yields whether Tune restores it.

    A restart with other settings is refused; then the folder is locked for the whole block
    (two would run and report each other's trials), and before Tune reads or writes it: its
    state checked when restoring; files written from here on not group/other-writable (umask
    022 added), so that the state Tune writes passes the check at the next restore; the config
    (`saved`) written without credentials at the first start."""
    restoring = tune.Tuner.can_restore(str(out_dir))
    if restoring and saved.is_file():
        refuse_changed_restart(kind, out_dir, config_yaml, saved)
    with DirLock(out_dir, kind, "name= or storage_path="):
        if restoring:
            check_state_trusted(out_dir)
        os.umask(os.umask(0o022) | 0o022)
        if not saved.is_file():
            saved.write_text(redact_text(config_yaml))
        yield restoring


def output_pass(out_dir: Path) -> int:
    """How many times outputs were written into `out_dir` before (summary.json's "pass"): the
    step of the parent run's metrics. Uploads are idempotent per (key, step), so a restarted
    sweep logging at the first pass's step again would leave MLflow with the old counts."""
    try:
        return int(json.loads((out_dir / "summary.json").read_text()).get("pass", 0)) + 1
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


# --------------------------------------------------------------------------- the sweep

def trial_setup(cfg: SweepConfig, train_cfg: Config, parent_run_id: str | None) -> TrialSetup:
    """Paths made absolute: trials run in other working directories (and on other nodes,
    where the sweep dir and data must be on a shared file system)."""
    overrides = [*cfg.train_overrides, *cfg.axis.train_overrides(),
                 f"data.data_dir={Path(train_cfg.data.data_dir).resolve()}",
                 f"tracking.tracking_uri={resolve_tracking_uri(train_cfg.tracking)}"]
    return TrialSetup(str(Path(cfg.train_config).resolve()), tuple(overrides), str(cfg.sweep_dir),
                      parent_run_id, cfg.axis.metric, None if cfg.budget_mode else cfg.cost_limit)


def refuse_changed_restart(kind: str, out_dir: Path, now_yaml: str, saved_path: Path) -> None:
    """A restarted sweep or comparison must have the settings it started with (but
    RESTART_MAY_CHANGE): the saved Tune experiment would silently ignore other values."""
    saved = yaml.safe_load(redact_text(saved_path.read_text()))  # credentials are no setting
    now = yaml.safe_load(redact_text(now_yaml))
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in RESTART_MAY_CHANGE and saved.get(k) != now.get(k))
    if changed:
        raise SweepError(f"{out_dir} holds a {kind} started with other settings ({', '.join(changed)} "
                         f"differ from {saved_path}); choose another name= or storage_path=, or "
                         f"delete that folder to start over")


def parent_tracker(kind: str, name: str, out_dir: Path, train_cfg: Config) -> Tracker:
    """The MLflow run of a sweep or comparison (the trials' runs nest under it); resumed with it."""
    tracking = dataclasses.replace(train_cfg.tracking, run_name=f"{kind} {name}",
                                   tracking_uri=resolve_tracking_uri(train_cfg.tracking))
    if tracking.enabled:
        try:
            ensure_store(tracking.tracking_uri)  # schema created once, before trials fan out
        except Exception as exc:  # the Tracker keeps records locally and warns
            print(redact_text(f"MLflow store {tracking.tracking_uri} not ready: {exc}").splitlines()[0],
                  file=sys.stderr)
    return Tracker(tracking, 0, out_dir, tags={"spikeprune.kind": kind})


def collect(cfg: SweepConfig) -> list[TrialOutcome]:
    """Every trial of the experiment with its status and final numbers."""
    outcomes = []
    for trial in tune.ExperimentAnalysis(str(cfg.sweep_dir)).trials:
        last = trial.last_result or {}
        if trial.status == "ERROR":
            status = "error"
        elif last.get("finished"):
            status = "finished"
        elif trial.status == "TERMINATED":
            status = "early_stopped"
        else:
            status = "unfinished"
        run_dir = cfg.sweep_dir / trial_dirname_for(trial.trial_id) / "run"
        run_id_file = run_dir / "mlflow_run_id"
        done = status == "finished"
        outcomes.append(TrialOutcome(
            trial_id=trial.trial_id, status=status,
            params={k: v for k, v in (trial.config or {}).items() if isinstance(v, (int, float))},
            val_top1=last.get("val_top1") if done else None,
            sops_per_sample=last.get("sops_per_sample") if done else None,
            cost=last.get("cost") if done else None, test_cost=last.get("test_cost"),
            test_top1=last.get("test_top1"), test_top5=last.get("test_top5"),
            test_sops_per_sample=last.get("test_sops_per_sample"),
            connectivity=last.get("connectivity") if done else None,
            energy_pj_per_sample=last.get("energy_pj_per_sample"),
            weight_keep=last.get("weight_keep") if done else None,
            neuron_keep=last.get("neuron_keep") if done else None,
            run_dir=str(run_dir) if run_dir.is_dir() else None,
            mlflow_run_id=run_id_file.read_text().strip() if run_id_file.is_file() else None,
            failures=trial.num_failures))
    return sorted(outcomes, key=lambda t: t.trial_id)


def close_stopped_runs(outcomes: list[TrialOutcome], tracking_uri: str) -> None:
    """A trial ASHA stopped dies mid-epoch, leaving its MLflow run RUNNING with records still
    pending in its run dir: upload them and mark the run KILLED, tagged as early-stopped.
    `tracking_uri`: the sweep's (config.yaml holds it without its credentials)."""
    for t in outcomes:
        if t.status != "early_stopped" or t.run_dir is None:
            continue
        config_file = Path(t.run_dir) / "config.yaml"
        if not config_file.is_file():
            continue
        tracking = dataclasses.replace(load_config(config_file).tracking, tracking_uri=tracking_uri)
        tracker = Tracker(tracking, 0, t.run_dir)
        tracker.set_tags({"tune.status": "early_stopped"})
        tracker.finish("KILLED")


def write_outputs(cfg: SweepConfig, outcomes: list[TrialOutcome], tracker: Tracker) -> dict:
    """results.txt, pareto.png, summary.json, best_configs/; printed and logged to the parent."""
    keys = sorted({k for t in outcomes for k in t.params})
    unit = cfg.axis.unit
    answers = pareto.best_per_budget(outcomes, cfg.budgets, cfg.budget_tolerance, cfg.axis.unit)
    front = pareto.pareto_front(outcomes)
    out = cfg.sweep_dir
    best_dir = out / "best_configs"
    best_dir.mkdir(exist_ok=True)
    for a in answers:
        if a.feasible and a.best.run_dir and (Path(a.best.run_dir) / "config.yaml").is_file():
            shutil.copyfile(Path(a.best.run_dir) / "config.yaml", best_dir / f"budget_{a.budget:.4g}.yaml")
    counts = {s: sum(t.status == s for t in outcomes) for s in ("finished", "early_stopped", "error", "unfinished")}
    text = "\n\n".join([
        f"sweep {cfg.name}: {len(outcomes)} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        f"budgets in {unit}; all trials (val_top1, SOPs/sample and budgeted cost: the fine-tuned "
        "hardened net on the validation split; test_top1, connectivity, energy: the launcher's "
        "final report on the test split)\n" + pareto.table(outcomes, keys, unit),
        "Pareto front (finished trials only)\n" + pareto.table(front, keys, unit),
        "best trial per budget\n" + pareto.budget_table(answers, keys, unit),
        "\n".join(a.message() for a in answers),
    ])
    (out / "results.txt").write_text(text + "\n")
    pareto.plot(out / "pareto.png", outcomes, answers, unit)
    doc = {"name": cfg.name, "sweep_dir": str(out), "config": redact(to_dict(cfg)), "budget_unit": unit,
           "parent_run_id": tracker.run_id, "pass": output_pass(out), **pareto.summary(outcomes, answers)}
    pareto.write_json(out / "summary.json", doc)
    print(text, flush=True)

    metrics = {f"{s}_trials": n for s, n in counts.items()}
    metrics["pareto_front_size"] = len(front)
    for a in answers:
        tag = f"budget_{a.budget:.0f}"
        metrics[f"{tag}_feasible"] = float(a.feasible)
        if a.feasible:
            metrics.update({f"{tag}_val_top1": a.best.val_top1, f"{tag}_sops_per_sample": a.best.sops_per_sample,
                            f"{tag}_cost": a.best.cost})
            if a.best.test_top1 is not None:
                metrics[f"{tag}_test_top1"] = a.best.test_top1
    tracker.log_metrics(metrics, step=doc["pass"])
    for name in ("results.txt", "pareto.png", "summary.json"):
        tracker.log_artifact(out / name)
    if any(best_dir.iterdir()):
        tracker.log_artifact(best_dir, "best_configs")
    return doc


def run_sweep(cfg: SweepConfig, trainable=run_trial) -> dict:
    """Run (or continue) the sweep; returns the summary. `trainable` is `run_trial` unless a
    test wraps it."""
    train_cfg = base_train_config(cfg)
    if cfg.address is not None:
        check_reachable(cfg.address)  # before anything is written
    with held_out_dir("sweep", cfg.sweep_dir, cfg.sweep_dir / "sweep_config.yaml",
                      sweep_config_yaml(cfg)) as restoring:
        return _run_locked(cfg, trainable, train_cfg, restoring)


def _run_locked(cfg: SweepConfig, trainable, train_cfg: Config, restoring: bool) -> dict:
    out = cfg.sweep_dir
    saved = out / "sweep_config.yaml"

    connect_ray(cfg.address, cfg.local_cpus, cfg.sweep_dir)
    try:
        from launcher.train import ensure_demo_data

        ensure_demo_data(train_cfg)  # once here: concurrent trials would all write it
        tracker = parent_tracker("sweep", cfg.name, cfg.sweep_dir, train_cfg)
        if not restoring:
            tracker.log_params(flatten_dict(to_dict(cfg), delimiter="."))
            tracker.log_artifact(saved)
        setup = trial_setup(cfg, train_cfg, tracker.run_id)
        resources = {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}
        fn = tune.with_resources(tune.with_parameters(trainable, setup=setup), resources)
        if restoring:
            print(f"continuing the sweep in {out}", flush=True)
            tuner = tune.Tuner.restore(str(out), trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                fn, param_space=param_space(cfg),
                tune_config=tune.TuneConfig(
                    search_alg=search_algorithm(cfg), scheduler=scheduler(cfg, train_cfg),
                    num_samples=cfg.num_trials, max_concurrent_trials=cfg.max_concurrent_trials,
                    reuse_actors=False,  # a fresh process per trial: the process group is global
                    trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=cfg.name, storage_path=str(out.parent),
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        ray.shutdown()

    outcomes = collect(cfg)
    close_stopped_runs(outcomes, resolve_tracking_uri(train_cfg.tracking))
    doc = write_outputs(cfg, outcomes, tracker)
    unfinished = doc["counts"]["unfinished"] + max(0, cfg.num_trials - len(outcomes))
    doc["interrupted"] = unfinished > 0
    if unfinished:
        tracker.finish("KILLED")
        print(f"sweep interrupted with {unfinished} trials unfinished; run the same command again "
              f"to continue", file=sys.stderr, flush=True)
    else:
        tracker.finish()
    print(f"outputs in {out} (results.txt, pareto.png, summary.json); "
          f"MLflow: {tracker.ui_command()}", flush=True)
    return doc


def job_main(argv: list[str] | None, *, prog: str, description: str, kind: str, example: str,
             overrides_help: str, load, run) -> int:
    """The CLI of a Ray Tune job (a sweep, a comparison): one error line and exit 2 for a bad
    config or an unreachable cluster, 130 when interrupted (run the same command to continue)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description)
    parser.add_argument("--config", required=True, help=f"{kind} YAML file, e.g. {example}")
    parser.add_argument("--address", help="auto or HOST:PORT of a running Ray cluster "
                                          "(default: the config's address; none: a local Ray)")
    parser.add_argument("overrides", nargs="*", help=f"key=value, e.g. {overrides_help}")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        if args.address is not None:
            cfg.address = args.address
        doc = run(cfg)
    except ConfigError as exc:
        print(f"{kind} config error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (SweepError, DirLocked) as exc:
        print(f"{kind} error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one makes Tune stop and save)
        print(f"{kind} interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if doc["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, prog="python tuning/sweep.py", description=__doc__.splitlines()[0], kind="sweep",
                    example="configs/sweep_demo.yaml",
                    overrides_help="num_trials=4 search.lambda_w=[1e-12,1e-10]",
                    load=load_sweep_config, run=run_sweep)


if __name__ == "__main__":
    sys.exit(main())
