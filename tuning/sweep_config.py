"""The typed config of a sweep: YAML file + `key=value` overrides, checked like the launcher's.

A sweep config names a training config (any `configs/*.yaml` the launcher accepts) plus the
overrides every trial gets, the budgets (SOPs per sample, or pJ per sample under a named
hardware model: `energy_model`), the knobs to search and how to run the search.
Scalars are validated by `launcher.config` (same types, same one-line `ConfigError` naming the
key); the sweep adds two list-valued kinds: `budgets` and search ranges
(`[low, high]`, sampled log-uniformly).

    python -m tuning.sweep_config --config configs/sweep_demo.yaml num_trials=4
prints the resolved sweep config as YAML.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from launcher.config import (Config, ConfigError, EnergyModelName, as_float, build_dataclass, checked, load_config,
                             print_config_main, read_yaml_with_overrides)

Range = tuple[float, float]  # [low, high], sampled log-uniformly

# Search-space name -> the training config key it sets in each trial.
SEARCH_KEYS = {
    "lambda_w": "pruning.lambda_w",
    "lambda_n": "pruning.lambda_n",
    "beta_T": "pruning.beta_T",
    "lr": "optim.lr",
    "mask_lr": "optim.mask_lr",
}
@dataclass(frozen=True)
class BudgetAxis:
    """What the budgets of a sweep or comparison count: SOPs per sample (`energy_model` None), or
    pJ per sample under a named hardware model (docs/ENERGY.md). Trials are ranked, checked
    against the budgets and plotted on this axis."""

    energy_model: Optional[str] = None

    @property
    def metric(self) -> str:
        """The key of the budgeted figure in the launcher's epoch metrics and results.json."""
        return "sops_per_sample" if self.energy_model is None else f"energy_pj_per_sample/{self.energy_model}"

    @property
    def train_key(self) -> str:
        """The training config key that puts a run in budget mode on this axis."""
        return "pruning.sop_budget" if self.energy_model is None else "pruning.energy_budget_pj"

    @property
    def unit(self) -> str:
        return "SOPs/sample" if self.energy_model is None else f"pJ/sample ({self.energy_model})"

    def train_overrides(self) -> list[str]:
        """What every trial's training config gets so that its budget is priced on this axis."""
        return [] if self.energy_model is None else [f"pruning.energy_model={self.energy_model}"]

    def check_train_config(self, train: Config) -> None:
        """The trials set `train_key`; a budget on the other axis in the training config would
        conflict with it in every trial (refused here, not in each trial)."""
        other = "pruning.energy_budget_pj" if self.energy_model is None else "pruning.sop_budget"
        if getattr(train.pruning, other.split(".")[1]) is not None:
            raise ConfigError(f"train_config: {other} is set, but the trials' budgets are "
                              f"{self.unit} ({self.train_key}); remove it from the training config")


@dataclass
class SearchSpace:
    """What the sweep searches: each knob a log-uniform `[low, high]`; null keeps the training
    config's value. docs/METHOD.md §4 ranges for lambda: CIFAR-10 5e-12..5e-11, DVS 1e-10..1e-9,
    ImageNet 5e-11..2e-10."""

    lambda_w: Optional[Range] = None
    lambda_n: Optional[Range] = None
    beta_T: Optional[Range] = None
    lr: Optional[Range] = None
    mask_lr: Optional[Range] = None

    def ranges(self) -> dict[str, Range]:
        """{training config key: (low, high)} of the knobs that are searched."""
        return {SEARCH_KEYS[name]: r for name, r in dataclasses.asdict(self).items() if r is not None}


@dataclass
class Resources:
    """What one trial reserves on the Ray cluster. A trial is one training process (one rank):
    `train()` runs inside the trial's Ray worker. A multi-GPU DeepSpeed trial (several ranks
    per trial, e.g. Ray Train's TorchTrainer around `train()`) is not supported yet."""

    cpus: float = field(default=1.0, metadata=checked("positive"))
    gpus: float = field(default=0.0, metadata=checked("non_negative"))


@dataclass
class SchedulerConfig:
    """ASHA stops trials whose hard-mask validation accuracy trails at a search epoch (trials
    over the largest budget rank below all others: tuning.sweep.rung_score)."""

    name: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=1, metadata=checked("positive"))  # search epochs
    reduction_factor: float = 2.0


@dataclass
class SweepConfig:
    train_config: str = "configs/demo.yaml"
    # `section.key=value` applied to every trial, before the searched knobs.
    train_overrides: list[str] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # SOPs per sample, or pJ (energy_model)
    # null: budgets are SOPs per sample; a hardware model's name: pJ per sample under it.
    energy_model: Optional[EnergyModelName] = None
    # Budget mode: each trial runs with pruning.sop_budget (or pruning.energy_budget_pj) set to
    # one of the budgets (the launcher adapts the lambdas to land on it) and the search covers
    # the other knobs.
    budget_mode: bool = False
    # A trial fits a budget B when its SOPs (or pJ) per sample <= B * (1 + budget_tolerance).
    budget_tolerance: float = field(default=0.0, metadata=checked("non_negative"))
    search: SearchSpace = field(default_factory=SearchSpace)
    num_trials: int = field(default=8, metadata=checked("positive"))
    max_concurrent_trials: Optional[int] = field(default=None, metadata=checked("positive"))
    resources: Resources = field(default_factory=Resources)
    # optuna: multi-objective TPE (max val_top1, min SOPs, SOPs over the largest budget as
    # a constraint); random: independent log-uniform samples.
    search_alg: Literal["optuna", "random"] = "optuna"
    seed: int = 0  # of the search algorithm
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_failures: int = field(default=2, metadata=checked("non_negative"))  # retries per trial
    storage_path: str = "runs/sweeps"  # the sweep lives in storage_path/name
    name: str = "sweep"
    # null: start a local Ray; "auto" or "HOST:PORT": join a running cluster.
    address: Optional[str] = None
    local_cpus: Optional[int] = field(default=None, metadata=checked("positive"))  # local Ray only

    @property
    def sweep_dir(self) -> Path:
        return (Path(self.storage_path) / self.name).resolve()

    @property
    def axis(self) -> BudgetAxis:
        return BudgetAxis(self.energy_model)

    @property
    def cost_limit(self) -> float:
        """SOPs (or pJ) per sample above which a trial fits no budget."""
        return max(self.budgets) * (1 + self.budget_tolerance)


# --------------------------------------------------------------------------- list-valued fields

def _range(key: str, value: Any) -> Range | None:
    if value is None:
        return None
    bounds = [as_float(v) for v in value] if isinstance(value, (list, tuple)) else []
    if len(bounds) != 2 or None in bounds or not 0 < bounds[0] < bounds[1]:
        raise ConfigError(f"{key}: expected [low, high] with 0 < low < high (log-uniform), "
                          f"got {value!r}")
    return bounds[0], bounds[1]


def parse_budgets(key: str, value: Any) -> list[float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = [as_float(v) for v in items]
    if not out or any(v is None or v <= 0 for v in out):
        raise ConfigError(f"{key}: expected a list of budgets per sample (SOPs, or pJ with "
                          f"energy_model; numbers > 0), "
                          f"got {value!r}")
    return sorted(set(out))


def parse_strings(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{key}: expected a list of 'section.key=value' strings, got {value!r}")
    return list(value)


_LIST_FIELDS = {Optional[Range]: _range, list[float]: parse_budgets, list[str]: parse_strings}


# --------------------------------------------------------------------------- public API

def base_train_config(cfg: SweepConfig) -> Config:
    """The training config every trial starts from (file + train_overrides), validated."""
    try:
        return load_config(cfg.train_config, cfg.train_overrides)
    except ConfigError as exc:
        raise ConfigError(f"train_config {cfg.train_config} (+ train_overrides): {exc}") from None


def _cross_checks(cfg: SweepConfig) -> None:
    if not cfg.budgets:
        raise ConfigError("budgets: give at least one budget per sample (SOPs, or pJ with energy_model), "
                          "e.g. budgets=[2e5,5e5]")
    ranges = cfg.search.ranges()
    if cfg.budget_mode:
        for name in ("lambda_w", "lambda_n"):
            if getattr(cfg.search, name) is not None:
                raise ConfigError(f"search.{name}: budget mode adapts the lambdas itself; search "
                                  f"beta_T, lr or mask_lr instead (or set budget_mode=false)")
    if not ranges:
        raise ConfigError("search: empty search space; give at least one of "
                          + ", ".join(SEARCH_KEYS) + " as [low, high]"
                          + (" (budget mode: not the lambdas)" if cfg.budget_mode else ""))
    if cfg.budget_mode and cfg.scheduler.name == "asha" and len(cfg.budgets) > 1:
        raise ConfigError("scheduler.name: ASHA compares every trial at a rung, and in budget mode a "
                          "trial on a small budget is less accurate by design, so ASHA would stop it; "
                          "use scheduler.name=none, or one budget per sweep")
    if cfg.scheduler.reduction_factor <= 1:
        raise ConfigError(f"scheduler.reduction_factor: must be > 1, got {cfg.scheduler.reduction_factor}")
    if cfg.address is not None and not cfg.address.strip():
        raise ConfigError("address: empty (use auto, HOST:PORT, or null for a local Ray)")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: expected a folder name without '/', got {cfg.name!r}")

    train = base_train_config(cfg)
    p = train.pruning
    if not p.enabled:
        raise ConfigError("train_config: pruning.enabled is false; a sweep tunes the pruning")
    if cfg.budget_mode:
        cfg.axis.check_train_config(train)
    if p.search_epochs < 1 or p.finetune_epochs < 1:
        raise ConfigError(f"train_config: a sweep compares fine-tuned hardened networks: needs "
                          f"pruning.search_epochs >= 1 and pruning.finetune_epochs >= 1, got "
                          f"{p.search_epochs} and {p.finetune_epochs}")
    if cfg.scheduler.name == "asha" and p.search_epochs < cfg.scheduler.grace_period:
        raise ConfigError(f"scheduler.grace_period: {cfg.scheduler.grace_period} search epochs, but "
                          f"the training config has pruning.search_epochs={p.search_epochs} "
                          f"(lower it or use scheduler.name=none)")
    if "pruning.beta_T" in ranges and ranges["pruning.beta_T"][0] < p.beta_0:
        raise ConfigError(f"search.beta_T: low end {ranges['pruning.beta_T'][0]} is below "
                          f"pruning.beta_0={p.beta_0}")


def from_dict(data: dict) -> SweepConfig:
    cfg = build_dataclass(SweepConfig, data, what="sweep config", parsers=_LIST_FIELDS)
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: SweepConfig) -> dict:
    """Plain nested data (ranges as lists) that `from_dict` reads back."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, (list, tuple)) else v

    return plain(dataclasses.asdict(cfg))


def sweep_config_yaml(cfg: SweepConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """YAML file, then `key=value` overrides (dotted keys, YAML values), then validation."""
    return from_dict(read_yaml_with_overrides(path, overrides, what="sweep config file"))


def main(argv: list[str] | None = None) -> int:
    return print_config_main(argv, load_sweep_config, sweep_config_yaml, "Print the resolved sweep config.",
                             "sweep config")


if __name__ == "__main__":
    sys.exit(main())
