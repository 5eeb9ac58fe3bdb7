"""A budget-matched comparison of pruning methods (docs/METHOD.md §8).

    python tuning/compare.py --config configs/compare_demo.yaml [key=value ...]
    python -m tuning.compare  (the same)

For every budget (SOPs per sample, or with `energy_model` pJ per sample under that hardware
model, docs/ENERGY.md) and seed: `joint` (weights + neurons, the paper), `weights` (weight masks
only) and `neurons` (neuron masks only) in budget mode, so each lands on the budget;
`magnitude`: global magnitude pruning of the trained `dense` network onto the budget, then
fine-tuned as long as the others' fine-tune phase; and per seed one `dense` run (pruning off,
trained as long as a search + fine-tune), the reference of every energy ratio (SOPs, and energy under every named model).

Every trial is one `launcher.train.train(cfg)` run under Ray Tune (the sweep machinery:
parallel trials, restartable, one MLflow parent run with a nested run per trial); a magnitude
trial waits for its dense run to finish and reads it from its run directory. Every figure is
the launcher's final report on the full test split. Outputs in `storage_path/name/`:
`results.txt` (method x budget tables: accuracy and SOPs; energy under every model),
`compare.png` (top-1 against the budgeted figure),
`summary.json`; the same are artifacts of the parent run. Starting the same command again
continues an interrupted comparison.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # `python tuning/compare.py`: run the module proper, so that Tune pickles the trainable by
    # reference to `tuning.compare` (as tuning/sweep.py does).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tuning.compare import main

    sys.exit(main())

import ray
from ray import tune

from launcher.config import ConfigError, load_config
from launcher.redact import redact, redact_text
from launcher.tracking import resolve_tracking_uri
from tuning.compare_config import (CompareConfig, compare_config_yaml, load_compare_config, to_dict)
from tuning.sweep import (_one_rank_environment, check_reachable, connect_ray, job_main, output_pass,
                          held_out_dir, parent_tracker)
from model.energy_models import MODELS as ENERGY_MODELS
from tuning.sweep_config import BudgetAxis, base_train_config

# What each method sets in the training config (docs/METHOD.md §8); budget and dense run added per trial.
METHOD_OVERRIDES = {
    "dense": ["pruning.enabled=false"],
    "joint": [],
    "weights": ["pruning.prune_neurons=false"],
    "neurons": ["pruning.prune_weights=false"],
    "magnitude": ["pruning.prune_neurons=false", "pruning.search_epochs=0"],
}


# --------------------------------------------------------------------------- trials

def trial_specs(cfg: CompareConfig) -> list[dict]:
    """Dense runs first, magnitude last: Tune starts grid points in order, so the runs that
    others wait for are started before them."""
    specs = [{"method": "dense", "budget": None, "seed": s} for s in cfg.seeds if "dense" in cfg.methods]
    for method in (m for m in cfg.methods if m != "dense"):
        specs += [{"method": method, "budget": b, "seed": s} for b in cfg.budgets for s in cfg.seeds]
    return specs


def trial_key(spec: dict) -> str:
    budget = "" if spec["budget"] is None else f"_b{spec['budget']:.4g}"
    return f"{spec['method']}{budget}_s{spec['seed']}"


def run_dir_of(out_dir: Path, spec: dict) -> Path:
    return Path(out_dir) / "runs" / trial_key(spec)


def dense_spec(seed: int) -> dict:
    return {"method": "dense", "budget": None, "seed": seed}


@dataclass(frozen=True)
class CompareSetup:
    """What every trial needs besides its spec (sent once through Ray)."""

    train_config: str  # absolute path
    train_overrides: tuple[str, ...]  # with absolute data dir and tracking URI
    out_dir: str
    parent_run_id: str | None
    dense_wait_s: float
    axis: BudgetAxis


def wait_for_dense(dense_dir: Path, timeout_s: float) -> None:
    """Block until the dense run of this seed has written its final results."""
    deadline = time.monotonic() + timeout_s
    while not (dense_dir / "results.json").is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"pruning.magnitude_from: the dense run {dense_dir} did not finish within "
                              f"{timeout_s:g} s (dense_wait_s)")
        time.sleep(5.0)


def trial_overrides(spec: dict, setup: CompareSetup) -> list[str]:
    out_dir = Path(setup.out_dir)
    run_dir = run_dir_of(out_dir, spec)
    extra = list(METHOD_OVERRIDES[spec["method"]])
    if spec["budget"] is not None:
        extra += [f"{setup.axis.train_key}={spec['budget']}", *setup.axis.train_overrides()]
    if spec["method"] == "magnitude":
        dense_dir = run_dir_of(out_dir, dense_spec(spec["seed"]))
        extra += [f"pruning.magnitude_from={dense_dir}", f"pruning.dense_reference={dense_dir}"]
    return [*setup.train_overrides, *extra, f"seed={spec['seed']}", f"data.seed={spec['seed']}",
            f"checkpoint.run_dir={run_dir}", f"tracking.run_name={trial_key(spec)}"]


def run_compare_trial(config: dict, setup: CompareSetup) -> None:
    """The Tune trainable: one training run of one (method, budget, seed), reported every epoch.
    Its run dir is fixed by the spec, so a retried or restored trial resumes its checkpoint."""
    from launcher.train import train  # torch, DeepSpeed: only in the trial's process

    _one_rank_environment()
    spec = config["trial"]
    if spec["method"] == "magnitude":
        wait_for_dense(run_dir_of(Path(setup.out_dir), dense_spec(spec["seed"])), setup.dense_wait_s)
    cfg = load_config(setup.train_config, trial_overrides(spec, setup))

    def report_epoch(metrics: dict) -> None:  # no "a/b" keys: Tune would read them as nested
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and "/" not in k})

    results = train(cfg, reporter=report_epoch, parent_run_id=setup.parent_run_id)
    tune.report({"finished": True, "phase": "done",
                 **{k: v for k, v in results.items() if isinstance(v, (int, float)) and "/" not in k}})


def trial_dirname(trial) -> str:
    """Tune's folder name of a trial: its key (Tune pickles this function)."""
    return trial_key(trial.config["trial"])


# --------------------------------------------------------------------------- results

@dataclass
class Outcome:
    """One trial's final report (test split) as the launcher wrote it, or why there is none."""

    method: str
    budget: float | None
    seed: int
    status: str  # finished, error, unfinished
    results: dict
    mlflow_run_id: str | None


def collect(cfg: CompareConfig) -> list[Outcome]:
    errors = {}
    if (cfg.out_dir / "tuner.pkl").is_file():
        for trial in tune.ExperimentAnalysis(str(cfg.out_dir)).trials:
            if trial.status == "ERROR":
                errors[trial_key(trial.config["trial"])] = trial
    outcomes = []
    for spec in trial_specs(cfg):
        run_dir = run_dir_of(cfg.out_dir, spec)
        path, id_file = run_dir / "results.json", run_dir / "mlflow_run_id"
        status = "finished" if path.is_file() else ("error" if trial_key(spec) in errors else "unfinished")
        outcomes.append(Outcome(spec["method"], spec["budget"], spec["seed"], status,
                                json.loads(path.read_text()) if path.is_file() else {},
                                id_file.read_text().strip() if id_file.is_file() else None))
    return outcomes


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def _ratio(dense: dict, ours: dict, key: str) -> float | None:
    if dense.get(key) is None or not ours.get(key):
        return None
    return dense[key] / ours[key]


def summarise(cfg: CompareConfig, outcomes: list[Outcome]) -> dict:
    """Per (method, budget): mean / min / max over seeds of every figure; energy ratios
    against the same seed's dense run: SOPs ("energy_ratio", the paper's), and pJ under every
    named hardware model ("energy_pj/<model>", "ratio/<model>"). "cost": the budgeted figure."""
    cost = cfg.axis.metric
    dense = {o.seed: o.results for o in outcomes if o.method == "dense" and o.status == "finished"}
    cells = []
    for method in cfg.methods:
        for budget in ([None] if method == "dense" else cfg.budgets):
            runs = [o for o in outcomes if o.method == method and o.budget == budget]
            done = [o for o in runs if o.status == "finished"]
            cell = {"method": method, "budget": budget, "seeds": [o.seed for o in done],
                    "missing": [f"seed {o.seed}: {o.status}" for o in runs if o.status != "finished"]}
            for key in ("test_top1", "sops_per_sample", "connectivity", "weight_keep", "neuron_keep",
                        "test_samples"):
                cell[key] = _stats([float(o.results[key]) for o in done if o.results.get(key) is not None])
            cell["cost"] = _stats([float(o.results[cost]) for o in done if o.results.get(cost) is not None])
            cell["energy_ratio"] = _stats([r for o in done if o.seed in dense
                                           if (r := _ratio(dense[o.seed], o.results, "sops_per_sample"))])
            for m in ENERGY_MODELS:
                key = f"energy_pj_per_sample/{m}"
                cell[f"energy_pj/{m}"] = _stats([float(o.results[key]) for o in done if o.results.get(key) is not None])
                cell[f"ratio/{m}"] = _stats([r for o in done if o.seed in dense
                                             if (r := _ratio(dense[o.seed], o.results, key))])
            if budget is not None:
                cell["budget_error"] = _stats([o.results[cost] / budget - 1 for o in done if o.results.get(cost)])
            cells.append(cell)
    notes = []
    for seed, res in sorted(dense.items()):
        if res.get(cost) is None:
            continue
        over = [b for b in cfg.budgets if b >= res[cost]]
        if over:
            notes.append(f"budget(s) {', '.join(f'{b:.4g}' for b in over)} at or above the dense network's "
                         f"{res[cost]:.4g} {cfg.axis.unit} (seed {seed}): budget mode keeps everything there")
    for o in outcomes:
        if o.status != "finished":
            notes.append(f"{trial_key(dict(method=o.method, budget=o.budget, seed=o.seed))}: {o.status}")
    return {"budget_unit": cfg.axis.unit, "cost_key": cost, "cells": cells, "notes": notes, "trials": [
        {"method": o.method, "budget": o.budget, "seed": o.seed, "status": o.status,
         "mlflow_run_id": o.mlflow_run_id, "cost": o.results.get(cost),
         **{k: v for k, v in o.results.items() if isinstance(v, (int, float))}}
        for o in outcomes]}


def _fmt(stat: dict | None, spec: str, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    mean = format(stat["mean"] * scale, spec)
    if stat["n"] < 2:
        return mean
    return f"{mean} [{format(stat['min'] * scale, spec)}, {format(stat['max'] * scale, spec)}]"


def _budget(c: dict) -> str:
    return "-" if c["budget"] is None else f"{c['budget']:.4g}"


def table(summary: dict) -> str:
    """method x budget, mean [min, max] over seeds; all on the full test split. "off budget":
    of the budgeted figure (SOPs, or pJ under the comparison's energy model)."""
    from model.energy_report import aligned

    unit = summary["budget_unit"]
    cost = [] if unit == "SOPs/sample" else [unit]
    head = ["method", "budget", "seeds", "test top-1 %", "SOPs/sample", *cost, "off budget %", "x fewer SOPs",
            "connectivity %", "weight keep %", "neuron keep %", "test samples"]
    rows = []
    for c in summary["cells"]:
        rows.append([c["method"], _budget(c), str(len(c["seeds"])),
                     _fmt(c["test_top1"], ".2f", 100), _fmt(c["sops_per_sample"], ".4g"),
                     *(_fmt(c["cost"], ".4g") for _ in cost),
                     _fmt(c.get("budget_error"), "+.1f", 100), _fmt(c["energy_ratio"], ".3g"),
                     _fmt(c["connectivity"], ".3g", 100), _fmt(c["weight_keep"], ".3g", 100),
                     _fmt(c["neuron_keep"], ".3g", 100),
                     "-" if c["test_samples"] is None else f"{c['test_samples']['min']:.0f}"])
    return "\n".join(aligned(head, rows))


def energy_table(summary: dict) -> str:
    """method x budget: pJ per sample under every named model (docs/ENERGY.md) and how many
    times less than the same seed's dense run, means over seeds."""
    from model.energy_report import aligned, si_prefix

    head = ["method", "budget", *(f"{m} pJ/sample" for m in ENERGY_MODELS)]
    rows = []
    for c in summary["cells"]:
        cells = []
        for m in ENERGY_MODELS:
            pj, ratio = c[f"energy_pj/{m}"], c[f"ratio/{m}"]
            cells.append("-" if pj is None else si_prefix(pj["mean"]) + ("" if ratio is None else f" ({ratio['mean']:.3g}x)"))
        rows.append([c["method"], _budget(c), *cells])
    return "\n".join(aligned(head, rows))


def plot(path: Path, summary: dict) -> None:
    """Test top-1 against the budgeted figure (SOPs or pJ per sample, log x), one line per
    method, seeds as dots, the dense reference as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = {"joint": "tab:blue", "weights": "tab:orange", "neurons": "tab:green", "magnitude": "tab:red"}
    for method, colour in colours.items():
        trials = [t for t in summary["trials"] if t["method"] == method and t["status"] == "finished"]
        if not trials:
            continue
        ax.scatter([t["cost"] for t in trials], [100 * t["test_top1"] for t in trials],
                   color=colour, alpha=0.35, s=18)
        cells = sorted((c for c in summary["cells"] if c["method"] == method and c["cost"]),
                       key=lambda c: c["cost"]["mean"])
        ax.plot([c["cost"]["mean"] for c in cells], [100 * c["test_top1"]["mean"] for c in cells],
                "o-", color=colour, label=method)
    dense = [t for t in summary["trials"] if t["method"] == "dense" and t["status"] == "finished"]
    if dense:
        ax.scatter([t["cost"] for t in dense], [100 * t["test_top1"] for t in dense], marker="*",
                   s=160, color="black", label="dense", zorder=3)
    unit = summary["budget_unit"]
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit} (test split, log scale)")
    ax.set_ylabel("test top-1 (%)")
    n = next((t["test_samples"] for t in summary["trials"] if t.get("test_samples")), None)
    what = "SOP budgets" if unit == "SOPs/sample" else f"energy budgets, {unit}"
    ax.set_title(f"pruning methods at equal {what} ({int(n)} test samples)" if n else "pruning methods")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tag_dense_references(outcomes: list[Outcome], tracking_uri: str) -> None:
    """Each pruned trial's MLflow run names its dense run and carries the ratio against it
    (the pruned runs train beside the dense one, so this is known only at the end)."""
    from mlflow import MlflowClient

    dense = {o.seed: o for o in outcomes if o.method == "dense" and o.status == "finished"}
    client = MlflowClient(tracking_uri)
    for o in outcomes:
        ref = dense.get(o.seed)
        if o.method == "dense" or o.status != "finished" or ref is None or not o.mlflow_run_id:
            continue
        try:
            if ref.mlflow_run_id:
                client.set_tag(o.mlflow_run_id, "spikeprune.dense_reference_run", ref.mlflow_run_id)
            ratios = {"": _ratio(ref.results, o.results, "sops_per_sample"),
                      **{f"/{m}": _ratio(ref.results, o.results, f"energy_pj_per_sample/{m}") for m in ENERGY_MODELS}}
            for suffix, r in ratios.items():
                if r is not None:
                    client.log_metric(o.mlflow_run_id, f"energy_ratio_vs_dense{suffix}", r)
        except Exception as exc:  # the local summary stays the record
            print(redact_text(f"could not tag run {o.mlflow_run_id}: {exc}").splitlines()[0], file=sys.stderr)


def write_outputs(cfg: CompareConfig, outcomes: list[Outcome], tracker, wall_s: float) -> dict:
    summary = summarise(cfg, outcomes)
    out = cfg.out_dir
    text = "\n\n".join(filter(None, [
        f"comparison {cfg.name}: {len(outcomes)} trials, full test split, mean [min, max] over seeds "
        f"{cfg.seeds}; wall time {wall_s / 60:.1f} min",
        table(summary),
        "energy per sample under each hardware model (docs/ENERGY.md), x less than dense\n" + energy_table(summary),
        "\n".join(summary["notes"])]))
    (out / "results.txt").write_text(text + "\n")
    plot(out / "compare.png", summary)
    doc = {"name": cfg.name, "out_dir": str(out), "config": redact(to_dict(cfg)), "parent_run_id": tracker.run_id,
           "pass": output_pass(out), "wall_s": wall_s, **summary}
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    print(text, flush=True)
    metrics = {}
    for c in summary["cells"]:
        tag = c["method"] if c["budget"] is None else f"{c['method']}_b{c['budget']:.0f}"
        for key in ("test_top1", "sops_per_sample", "cost", "energy_ratio",
                    *(f"{k}/{m}" for m in ENERGY_MODELS for k in ("energy_pj", "ratio"))):
            if c[key] is not None:
                metrics[f"{tag}_{key}"] = c[key]["mean"]
    tracker.log_metrics(metrics, step=doc["pass"])  # a restart's figures are the latest
    for name in ("results.txt", "compare.png", "summary.json"):
        tracker.log_artifact(out / name)
    return doc


# --------------------------------------------------------------------------- the comparison

def run_compare(cfg: CompareConfig) -> dict:
    """Run (or continue) the comparison; returns the summary."""
    start = time.monotonic()
    train_cfg = base_train_config(cfg)
    if cfg.address is not None:
        check_reachable(cfg.address)
    with held_out_dir("comparison", cfg.out_dir, cfg.out_dir / "compare_config.yaml",
                      compare_config_yaml(cfg)) as restoring:
        return _run_locked(cfg, train_cfg, restoring, start)


def _run_locked(cfg: CompareConfig, train_cfg, restoring: bool, start: float) -> dict:
    out = cfg.out_dir
    saved = out / "compare_config.yaml"
    tracking_uri = resolve_tracking_uri(train_cfg.tracking)

    connect_ray(cfg.address, cfg.local_cpus, out)
    try:
        from launcher.train import ensure_demo_data

        ensure_demo_data(train_cfg)  # once here: concurrent trials would all write it
        tracker = parent_tracker("compare", cfg.name, out, train_cfg)
        if not restoring:
            tracker.log_params({k: str(v) for k, v in to_dict(cfg).items() if not isinstance(v, dict)})
            tracker.log_artifact(saved)
        setup = CompareSetup(str(Path(cfg.train_config).resolve()),
                             (*cfg.train_overrides, f"data.data_dir={Path(train_cfg.data.data_dir).resolve()}",
                              f"tracking.tracking_uri={tracking_uri}"),
                             str(out), tracker.run_id, cfg.dense_wait_s, cfg.axis)
        resources = {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}
        fn = tune.with_resources(tune.with_parameters(run_compare_trial, setup=setup), resources)
        specs = trial_specs(cfg)
        print(f"comparison {cfg.name}: {len(specs)} trials ({', '.join(cfg.methods)}; budgets "
              f"{[f'{b:.4g}' for b in cfg.budgets]}; seeds {cfg.seeds}) in {out}", flush=True)
        if restoring:
            print(f"continuing the comparison in {out}", flush=True)
            tuner = tune.Tuner.restore(str(out), trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                fn, param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent_trials,
                                            reuse_actors=False, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=cfg.name, storage_path=str(out.parent),
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        ray.shutdown()

    outcomes = collect(cfg)
    if train_cfg.tracking.enabled:
        tag_dense_references(outcomes, tracking_uri)
    doc = write_outputs(cfg, outcomes, tracker, time.monotonic() - start)
    unfinished = [o for o in outcomes if o.status == "unfinished"]
    doc["interrupted"] = bool(unfinished)
    if unfinished:
        tracker.finish("KILLED")
        print(f"comparison interrupted with {len(unfinished)} trials unfinished; run the same command "
              f"again to continue", file=sys.stderr, flush=True)
    else:
        tracker.finish()
    print(f"outputs in {out} (results.txt, compare.png, summary.json); MLflow: {tracker.ui_command()}",
          flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, prog="python tuning/compare.py", description=__doc__.splitlines()[0],
                    kind="compare", example="configs/compare_demo.yaml", overrides_help="seeds=[0] budgets=[2e4]",
                    load=load_compare_config, run=run_compare)


if __name__ == "__main__":
    sys.exit(main())
