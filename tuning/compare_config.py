"""The typed config of a method comparison: YAML file + `key=value` overrides, checked like
the launcher's (tuning/compare.py runs it).

    python -m tuning.compare_config --config configs/compare_demo.yaml seeds=[0]
prints the resolved config as YAML.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.config import (ConfigError, EnergyModelName, build_dataclass, checked, print_config_main,
                             read_yaml_with_overrides)
from tuning.sweep_config import BudgetAxis, Resources, base_train_config, parse_budgets, parse_strings

# docs/METHOD.md §8: what each method is.
METHODS = ("dense", "joint", "weights", "neurons", "magnitude")


@dataclass
class CompareConfig:
    train_config: str = "configs/demo.yaml"
    # `section.key=value` applied to every trial, before the method's own settings.
    train_overrides: list[str] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # SOPs per sample, or pJ (energy_model)
    # null: budgets are SOPs per sample; a hardware model's name: pJ per sample under it
    # (docs/ENERGY.md), every pruned method then lands on that energy.
    energy_model: Optional[EnergyModelName] = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    max_concurrent_trials: Optional[int] = field(default=None, metadata=checked("positive"))
    resources: Resources = field(default_factory=Resources)
    max_failures: int = field(default=1, metadata=checked("non_negative"))  # retries per trial
    # How long a magnitude trial waits for its dense run to finish before it gives up.
    dense_wait_s: float = field(default=7200.0, metadata=checked("positive"))
    storage_path: str = "runs/compare"  # the comparison lives in storage_path/name
    name: str = "compare"
    # null: start a local Ray; "auto" or "HOST:PORT": join a running cluster.
    address: Optional[str] = None
    local_cpus: Optional[int] = field(default=None, metadata=checked("positive"))  # local Ray only

    @property
    def axis(self) -> BudgetAxis:
        return BudgetAxis(self.energy_model)

    @property
    def out_dir(self) -> Path:
        return (Path(self.storage_path) / self.name).resolve()


def _methods(key: str, value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    unknown = [v for v in items if v not in METHODS]
    if unknown or not items:
        raise ConfigError(f"{key}: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})" if unknown
                          else f"{key}: give at least one of {', '.join(METHODS)}")
    return [m for m in METHODS if m in items]  # a fixed order: dense first, magnitude last


def _seeds(key: str, value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"{key}: expected a list of integer seeds, got {value!r}")
    return sorted(set(items))


_LIST_FIELDS = {list[float]: parse_budgets, list[str]: parse_strings}


def from_dict(data: dict) -> CompareConfig:
    data = dict(data or {})
    # methods and seeds are lists of their own kind; parsed by name before the generic walk
    methods = _methods("methods", data.pop("methods")) if "methods" in data else list(METHODS)
    seeds = _seeds("seeds", data.pop("seeds")) if "seeds" in data else [0, 1]
    cfg = build_dataclass(CompareConfig, data, what="compare config", parsers=_LIST_FIELDS)
    cfg.methods, cfg.seeds = methods, seeds
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: CompareConfig) -> None:
    pruned = [m for m in cfg.methods if m != "dense"]
    if pruned and not cfg.budgets:
        raise ConfigError("budgets: the pruned methods need at least one budget per sample (SOPs, "
                          "or pJ with energy_model), e.g. budgets=[2e4,6e4]")
    if "magnitude" in cfg.methods and "dense" not in cfg.methods:
        raise ConfigError("methods: magnitude prunes the trained dense network: add dense to methods")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: expected a folder name without '/', got {cfg.name!r}")
    if cfg.address is not None and not cfg.address.strip():
        raise ConfigError("address: empty (use auto, HOST:PORT, or null for a local Ray)")
    train = base_train_config(cfg)
    cfg.axis.check_train_config(train)
    p = train.pruning
    if p.search_epochs < 1 or p.finetune_epochs < 1:
        raise ConfigError(f"train_config: the comparison needs a search and a fine-tune phase: "
                          f"pruning.search_epochs >= 1 and pruning.finetune_epochs >= 1, got "
                          f"{p.search_epochs} and {p.finetune_epochs}")


def to_dict(cfg: CompareConfig) -> dict:
    return dataclasses.asdict(cfg)


def compare_config_yaml(cfg: CompareConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_compare_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    """YAML file, then `key=value` overrides (dotted keys, YAML values), then validation."""
    return from_dict(read_yaml_with_overrides(path, overrides, what="compare config file"))


def main(argv: list[str] | None = None) -> int:
    return print_config_main(argv, load_compare_config, compare_config_yaml,
                             "Print the resolved comparison config.", "compare config")


if __name__ == "__main__":
    sys.exit(main())
