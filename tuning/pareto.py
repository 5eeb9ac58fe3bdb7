"""Accuracy vs cost (SOPs, or pJ under a named hardware model, per sample): the Pareto front, the best trial per budget, a table, a plot, a JSON summary.

Pure functions over `TrialOutcome`s so they can be checked without Ray. Only *finished* trials
(search -> hardened subnetwork -> fine-tune -> test, all done) count: a trial the scheduler
stopped early never produced a hardened, fine-tuned network, and its last numbers are those
of a half-searched soft mask. `unit` names what the budgets and `cost` count
(tuning.sweep_config.BudgetAxis.unit).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from model.atomic import atomic_write

Status = Literal["finished", "early_stopped", "error", "unfinished"]


@dataclass
class TrialOutcome:
    """One trial as the sweep saw it. Accuracies are fractions; SOPs and energy per sample.

    val_top1 / sops_per_sample / cost: the fine-tuned hardened net's best validation epoch;
    cost is the budgeted figure (SOPs, or pJ under the sweep's energy model) that the search
    optimised and the budgets are checked against; test_*: the launcher's final report on the
    test split for that same network.
    """

    trial_id: str
    status: Status
    params: dict = field(default_factory=dict)  # {training config key: value} searched
    val_top1: Optional[float] = None
    sops_per_sample: Optional[float] = None
    cost: Optional[float] = None
    test_top1: Optional[float] = None
    test_top5: Optional[float] = None
    test_sops_per_sample: Optional[float] = None
    test_cost: Optional[float] = None
    connectivity: Optional[float] = None  # fraction of dense connections live (test split)
    energy_pj_per_sample: Optional[float] = None
    weight_keep: Optional[float] = None
    neuron_keep: Optional[float] = None
    run_dir: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    failures: int = 0

    @property
    def finished(self) -> bool:
        return (self.status == "finished" and self.val_top1 is not None
                and self.cost is not None and math.isfinite(self.cost))


@dataclass
class BudgetAnswer:
    budget: float  # in `unit`
    feasible: bool
    best: Optional[TrialOutcome]
    # When infeasible: the lowest cost any finished trial reached (None: no finished trial).
    lowest_cost: Optional[float] = None
    unit: str = "SOPs/sample"

    def message(self) -> str:
        if self.feasible:
            b = self.best
            return (f"budget {self.budget:.4g} {self.unit}: trial {b.trial_id} val {b.val_top1:.2%} "
                    f"test {b.test_top1:.2%} at {b.cost:.4g} {self.unit}")
        if self.lowest_cost is None:
            return f"budget {self.budget:.4g} {self.unit}: infeasible (no trial finished)"
        return (f"budget {self.budget:.4g} {self.unit}: infeasible (the lowest a finished "
                f"trial reached is {self.lowest_cost:.4g})")


def pareto_front(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    """Finished trials that no other finished trial beats on both axes (lower or equal cost
    and higher or equal accuracy, one of them strictly); sorted by cost."""
    done = sorted((t for t in trials if t.finished), key=lambda t: (t.cost, -t.val_top1))
    front, best_acc = [], -math.inf
    for t in done:  # ascending cost: on the front iff more accurate than everything cheaper
        if t.val_top1 > best_acc:
            front.append(t)
            best_acc = t.val_top1
    return front


def best_per_budget(trials: list[TrialOutcome], budgets: list[float],
                    tolerance: float = 0.0, unit: str = "SOPs/sample") -> list[BudgetAnswer]:
    """For each budget the most accurate finished trial within it (ties: lower cost)."""
    done = [t for t in trials if t.finished]
    answers = []
    for budget in budgets:
        fits = [t for t in done if t.cost <= budget * (1 + tolerance)]
        if fits:
            best = max(fits, key=lambda t: (t.val_top1, -t.cost))
            answers.append(BudgetAnswer(budget, True, best, unit=unit))
        else:
            lowest = min((t.cost for t in done), default=None)
            answers.append(BudgetAnswer(budget, False, None, lowest, unit))
    return answers


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _on_sops(unit: str) -> bool:
    return unit == "SOPs/sample"


def _columns(t: TrialOutcome, param_keys: list[str], unit: str) -> list[str]:
    cost = [] if _on_sops(unit) else [_fmt(t.cost, ".4g")]
    return [*(_fmt(t.params.get(k), ".3g") for k in param_keys), _fmt(t.val_top1, ".2%"),
            _fmt(t.test_top1, ".2%"), _fmt(t.sops_per_sample, ".4g"), *cost, _fmt(t.connectivity, ".2%"),
            _fmt(t.energy_pj_per_sample, ".4g")]


def _head(param_keys: list[str], unit: str) -> list[str]:
    """energy_pJ: the headline model's (horowitz45); a sweep on another model adds its column."""
    cost = [] if _on_sops(unit) else [unit]
    return [*(k.rsplit(".", 1)[-1] for k in param_keys), "val_top1", "test_top1", "SOPs/sample", *cost,
            "connectivity", "energy_pJ"]


def _render(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table(trials: list[TrialOutcome], param_keys: list[str], unit: str = "SOPs/sample") -> str:
    """Fixed-width text table, one row per trial, in the given order."""
    head = ["trial", "status", *_head(param_keys, unit)]
    rows = [[t.trial_id, t.status + (f" ({t.failures} retries)" if t.failures else ""),
             *_columns(t, param_keys, unit)] for t in trials]
    return _render(head, rows)


def budget_table(answers: list[BudgetAnswer], param_keys: list[str], unit: str = "SOPs/sample") -> str:
    """One row per budget: the best feasible trial, or 'infeasible'."""
    head = ["budget", "trial", *_head(param_keys, unit)]
    rows = []
    for a in answers:
        if a.feasible:
            rows.append([f"{a.budget:.4g}", a.best.trial_id, *_columns(a.best, param_keys, unit)])
        else:
            low = "none finished" if a.lowest_cost is None else f"lowest reached {a.lowest_cost:.4g}"
            rows.append([f"{a.budget:.4g}", f"infeasible ({low})"] + [""] * (len(head) - 2))
    return _render(head, rows)


def plot(path: str | os.PathLike, trials: list[TrialOutcome], answers: list[BudgetAnswer],
         unit: str = "SOPs/sample") -> str:
    """PNG: finished trials, the front as a staircase, the budgets, the best trial of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.finished]
    front = pareto_front(trials)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([t.cost for t in done], [100 * t.val_top1 for t in done], s=28,
               color="0.6", label=f"finished trials ({len(done)})", zorder=2)
    if front:
        ax.step([t.cost for t in front], [100 * t.val_top1 for t in front], where="post",
                color="tab:blue", lw=1.5, label="Pareto front", zorder=3)
        ax.scatter([t.cost for t in front], [100 * t.val_top1 for t in front], s=36,
                   color="tab:blue", zorder=4)
    for i, a in enumerate(answers):
        ax.axvline(a.budget, color="tab:red", ls="--", lw=1, label="budgets" if i == 0 else None)
    best = [a.best for a in answers if a.feasible]
    if best:
        ax.scatter([b.cost for b in best], [100 * b.val_top1 for b in best], s=140,
                   marker="*", color="tab:red", zorder=5, label="best within a budget")
    xs = [t.cost for t in done] + [a.budget for a in answers]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"{unit} (hardened, fine-tuned net; validation)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("accuracy vs synaptic operations" if _on_sops(unit) else f"accuracy vs energy, {unit}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.fspath(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def summary(trials: list[TrialOutcome], answers: list[BudgetAnswer]) -> dict:
    """Plain data for summary.json: every trial, the front (trial ids) and each budget's answer."""
    return {
        "budgets": [{"budget": a.budget, "feasible": a.feasible,
                     "best_trial": a.best.trial_id if a.best else None,
                     "lowest_reached": a.lowest_cost} for a in answers],
        "pareto_front": [t.trial_id for t in pareto_front(trials)],
        "counts": {s: sum(t.status == s for t in trials)
                   for s in ("finished", "early_stopped", "error", "unfinished")},
        "trials": [asdict(t) for t in trials],
    }


def write_json(path: str | os.PathLike, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
