"""One typed config for a training run: YAML file + `section.key=value` overrides.

Every value is checked against its dataclass field type (int, float, bool, str, Optional,
Literal, Union) and a few range rules; anything wrong is a `ConfigError` whose one-line
message names the key, so a typo never silently falls back to a default.

    python -m launcher.config --config configs/demo.yaml pruning.lambda_w=2e-11
prints the resolved config as YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from data_pipeline import DATASETS
from launcher.redact import redact_text
from model.atomic import atomic_write
from model.energy_models import MODELS as ENERGY_MODELS
from model.registry import MODELS

MODEL_NAMES = tuple(MODELS)  # the registries are the one source of the names a config may use
EnergyModelName = Literal[tuple(ENERGY_MODELS)]


class ConfigError(ValueError):
    """A config problem; the message is one line and names the offending key."""


def checked(rule: str) -> dict:
    """Field metadata naming a range rule that `_validate_field` enforces."""
    return {"rule": rule}


_RULES = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
}


@dataclass
class DataConfig:
    """Which FFCV data set to read and how (see data_pipeline.loaders.make_loaders)."""

    dataset: Literal[DATASETS] = "demo"
    data_dir: str = "data/demo"
    batch_size: int = field(default=64, metadata=checked("positive"))  # per rank, per micro step
    num_workers: int = field(default=1, metadata=checked("positive"))
    order: Literal["random", "sequential", "quasi_random"] = "random"
    os_cache: bool = True
    image_size: Optional[int] = field(default=None, metadata=checked("positive"))
    seed: int = 0  # sample order and augmentation of the loaders


@dataclass
class ModelConfig:
    """Arguments of model.build_model."""

    name: Literal[MODEL_NAMES] = "cifar10_6conv2fc"
    width: float = field(default=1.0, metadata=checked("positive"))
    num_classes: int = field(default=10, metadata=checked("positive"))
    T: int = field(default=8, metadata=checked("positive"))
    input_size: Optional[int] = field(default=None, metadata=checked("positive"))


@dataclass
class PruningConfig:
    """The learning process of docs/METHOD.md §3, §4, §6; `enabled: false` trains the dense baseline."""

    enabled: bool = True
    lambda_w: float = field(default=1e-11, metadata=checked("non_negative"))
    lambda_n: float = field(default=1e-11, metadata=checked("non_negative"))
    beta_0: float = field(default=5.0, metadata=checked("positive"))
    beta_T: float = field(default=1000.0, metadata=checked("positive"))
    search_epochs: int = field(default=800, metadata=checked("non_negative"))
    finetune_epochs: int = field(default=200, metadata=checked("non_negative"))
    prune_weights: bool = True
    prune_neurons: bool = True
    # Target SOPs per sample; when set, the lambdas adapt during the search to land on it.
    sop_budget: Optional[float] = field(default=None, metadata=checked("positive"))
    # The hardware model the energy budget is priced under (docs/ENERGY.md, model/energy_models.py).
    energy_model: EnergyModelName = "horowitz45"
    # Target pJ per sample under `energy_model`: budget mode on energy instead of SOPs.
    energy_budget_pj: Optional[float] = field(default=None, metadata=checked("positive"))
    # Dense SOPs per sample for the energy ratio: a number, the MLflow run id of a dense run,
    # or the run directory of a finished dense run (its results.json).
    dense_reference: Union[float, str, None] = None
    # The magnitude baseline (docs/METHOD.md §8): the run directory of a finished dense run;
    # its selected weights are pruned by global magnitude onto `sop_budget`, then fine-tuned.
    magnitude_from: Optional[str] = None


@dataclass
class OptimConfig:
    """Two optimisers in one (see launcher.ds_config.build_optimizer): mask logits use Adam."""

    weight_optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = field(default=1e-4, metadata=checked("positive"))
    mask_lr: float = field(default=1e-4, metadata=checked("positive"))
    momentum: float = field(default=0.9, metadata=checked("non_negative"))  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = field(default=0.0, metadata=checked("non_negative"))  # weights only
    schedule: Literal["none", "cosine"] = "none"
    finetune_lr: float = field(default=1e-4, metadata=checked("positive"))
    grad_clip: float = field(default=0.0, metadata=checked("non_negative"))  # 0: no clipping
    grad_accum: int = field(default=1, metadata=checked("positive"))


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine; the ds_config itself is derived by launcher.ds_config."""

    zero_stage: Literal[0, 1, 2] = 0
    # auto: bf16 on GPU, fp32 on CPU. fp16 is rejected (no loss scaling for the masks' logits).
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class CheckpointConfig:
    """Where a run lives; starting the same run_dir again resumes it."""

    run_dir: str = "runs/demo"
    every_steps: int = field(default=0, metadata=checked("non_negative"))  # 0: epoch ends only
    keep_last: int = field(default=2, metadata=checked("positive"))


@dataclass
class TrackingConfig:
    """MLflow on rank 0 (launcher.tracking)."""

    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db.
    tracking_uri: Optional[str] = None
    experiment: str = "spikeprune"
    run_name: Optional[str] = None
    # Upload the final checkpoint as an artifact: true, false (log its path only), or a size
    # limit in MB above which only its path is logged.
    log_checkpoint: Union[bool, float] = 1024.0
    retry_every_s: float = field(default=60.0, metadata=checked("positive"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0  # model initialisation and torch RNG
    # Caps for tests and the demo: optimizer steps per epoch, batches per validation pass;
    # None runs full epochs / full validations. The final test report always reads the whole
    # test split.
    steps_per_epoch_limit: Optional[int] = field(default=None, metadata=checked("positive"))
    eval_batches_limit: Optional[int] = field(default=None, metadata=checked("positive"))


# --------------------------------------------------------------------------- type checking

_NUMBER_WORDS = {".inf", "+.inf", "-.inf", ".nan"}


def as_float(value: Any) -> float | None:
    """YAML 1.1 reads `1e-11` (no dot) as a string; accept it and ints as floats, never bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        # No setting means anything at inf or nan: one would train on NaN for epochs first.
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip().lower() not in _NUMBER_WORDS:
        try:
            out = float(value)
        except ValueError:
            return None
        return out if math.isfinite(out) else None
    return None


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted value) for `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arm in typing.get_args(tp):
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if type(value) is type(choice) and value == choice:
                return True, value
        return False, None
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        out = as_float(value)
        return out is not None, out
    if tp is str:
        if isinstance(value, str):
            return True, value
        # A run name like 2024 or a run id of digits is still a string.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    raise TypeError(f"unsupported annotation {tp!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return tp.__name__


def _validate_field(key: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    if key == "deepspeed.precision" and value == "fp16":
        raise ConfigError("deepspeed.precision: fp16 is not supported (use bf16 or fp32)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    ok, out = _coerce(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    rule = f.metadata.get("rule")
    if rule is not None and out is not None and not isinstance(out, bool):
        test, text = _RULES[rule]
        if not test(out):
            raise ConfigError(f"{key}: {text}, got {out!r}")
    return out


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def build_dataclass(cls: type, data: Any, prefix: str = "", what: str = "config",
                    parsers: dict[Any, Callable[[str, Any], Any]] | None = None) -> Any:
    """A (nested) dataclass from plain data: unknown keys named with a suggestion, scalars
    type-checked against the annotations and `_check` rules. `parsers` maps a field type the
    scalar checks do not cover (lists, ranges) to `parse(key, value)`; tuning's sweep config
    is built by the same walk."""
    parsers = parsers or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or what}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown(f"{prefix}{key}", list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name], f"{key}.", what, parsers)
        elif tp in parsers:
            kwargs[name] = parsers[tp](key, data[name])
        else:
            kwargs[name] = _validate_field(key, f, tp, data[name])
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    if cfg.pruning.beta_T < cfg.pruning.beta_0:
        raise ConfigError(f"pruning.beta_T: must be >= pruning.beta_0 ({cfg.pruning.beta_0}), "
                          f"got {cfg.pruning.beta_T}")
    if cfg.pruning.enabled and not (cfg.pruning.prune_weights or cfg.pruning.prune_neurons):
        raise ConfigError("pruning.prune_weights: with pruning.enabled, prune_weights or "
                          "prune_neurons must be true")
    p = cfg.pruning
    if p.sop_budget is not None and p.energy_budget_pj is not None:
        raise ConfigError("pruning.energy_budget_pj: set pruning.sop_budget or pruning.energy_budget_pj, not both")
    if p.magnitude_from is not None:
        needs = {"pruning.enabled": (p.enabled, True), "pruning.prune_weights": (p.prune_weights, True),
                 "pruning.prune_neurons": (p.prune_neurons, False), "pruning.search_epochs": (p.search_epochs, 0)}
        for key, (value, wanted) in needs.items():
            if value != wanted:
                raise ConfigError(f"{key}: the magnitude baseline (pruning.magnitude_from) needs "
                                  f"{key}={str(wanted).lower()}, got {str(value).lower()}")
        if p.sop_budget is None and p.energy_budget_pj is None:
            raise ConfigError("pruning.sop_budget: the magnitude baseline (pruning.magnitude_from) "
                              "prunes onto a SOP budget (or pruning.energy_budget_pj): set one")


# --------------------------------------------------------------------------- public API

def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested plain data (a YAML document, a checkpoint)."""
    cfg = build_dataclass(Config, data, "")
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (YAML/JSON/torch-weights_only safe)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Config | dict) -> dict[str, Any]:
    """{"pruning.lambda_w": 1e-11, "seed": 0, ...}: one entry per leaf, for MLflow params; of a
    Config or of its nested dict form (as a checkpoint stores it)."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` or `--section.key=value` -> (["section", "key"], YAML value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = body.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({exc.problem})") from None
    return parts, value


def read_yaml_with_overrides(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                             what: str = "config file") -> dict:
    """YAML mapping from `path` (None: empty), then `a.b=value` overrides applied in order.

    Shared by the training config and tuning's sweep config; `what` names the file in errors.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{what} {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {str(p)!r}: invalid YAML ({exc})".replace("\n", " ")) from None
        # An empty file would otherwise start a full-default run (800 + 200 epochs).
        if data is None:
            raise ConfigError(f"{what} {str(p)!r} is empty; name at least the settings of the run")
        if not isinstance(data, dict):
            raise ConfigError(f"{what} {str(p)!r}: expected a mapping at the top level, "
                              f"got {type(data).__name__}")
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise _unknown(".".join(parts[: i + 2]), [])
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (None: all defaults), then overrides applied in order, then validation."""
    return from_dict(read_yaml_with_overrides(path, overrides))


def config_yaml(cfg: Config) -> str:
    return redact_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # printed and saved: no password


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically and durably (it names the run)."""
    atomic_write(path, config_yaml(cfg), fsync=True)


def print_config_main(argv: list[str] | None, load: Callable[[str | None, list[str]], Any],
                      to_yaml: Callable[[Any], str], description: str, what: str) -> int:
    """`python -m ... --config FILE [key=value ...]`: print the resolved config, or one error line."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", required=what != "config", help="YAML file" +
                        (" (default: built-in defaults)" if what == "config" else ""))
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"{what} error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    return print_config_main(argv, load_config, config_yaml, "Print the resolved spikeprune config.", "config")


if __name__ == "__main__":
    sys.exit(main())
