"""Open a finished run directory as the network it reports: config, selected weights, hard masks.

Everything deploy/ does starts here, so that the event engine and the NIR export run exactly
the network whose test figures are in results.json (best_model.pt, masks hardened, eval mode).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.loaders import make_loaders
from data_pipeline import DataError
from launcher.checkpoint import CheckpointError, find_resumable, safe_load
from launcher.config import Config, ConfigError, load_config
from model import build_model
from model.base import SpikingNet
from model.masks import MaskError, load_masks, masked_modules, set_mask_mode


class DeployError(ValueError):
    """A run directory that cannot be deployed; the message is the one line a user sees."""


@dataclass
class Run:
    path: Path
    cfg: Config
    net: SpikingNet  # selected weights, hard masks (or none: a dense run), eval mode
    results: dict  # results.json: test top-1, SOPs per sample, connectivity, ...
    energy: dict  # energy_report.json

    @property
    def pruned(self) -> bool:
        return self.cfg.pruning.enabled

    def loader(self, split: str = "test", batch_size: int | None = None):
        """The run's own data for `split` on the CPU, as training read it (val and test in
        file order, train in the run's order)."""
        d = self.cfg.data
        try:
            loaders = make_loaders(d.dataset, d.data_dir, batch_size=batch_size or d.batch_size,
                                   num_workers=d.num_workers, order=d.order, os_cache=d.os_cache,
                                   seed=d.seed, image_size=d.image_size)
        except DataError as exc:
            raise DeployError(str(exc)) from None
        if split not in loaders:
            raise DeployError(f"{d.data_dir}: no {split}.beton (splits here: {', '.join(sorted(loaders))})")
        return loaders[split]


def _phase(path: Path) -> str | None:
    try:
        ckpt = find_resumable(path)
    except CheckpointError:
        return None
    return ckpt.state.phase if ckpt is not None else None


def open_run(run_dir: str | Path) -> Run:
    """The run's reported network, or a DeployError saying in one line what is missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DeployError(f"{path}: no such run directory")
    if not (path / "config.yaml").is_file():
        raise DeployError(f"{path}: not a spikeprune run directory (no config.yaml)")
    if not (path / "results.json").is_file() or not (path / "best_model.pt").is_file():
        phase = _phase(path)
        where = f"still in its {phase} phase" if phase in ("search", "finetune") else "not finished"
        raise DeployError(f"{path}: the run is {where} (no results.json / best_model.pt): "
                          f"finish it first (python -m launcher.train resumes it)")
    try:
        cfg = load_config(path / "config.yaml")
    except ConfigError as exc:
        raise DeployError(f"{path}/config.yaml: {exc}") from None
    p = cfg.pruning
    net = build_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T,
                      width=cfg.model.width, input_size=cfg.model.input_size,
                      weight_masks=p.enabled and p.prune_weights, neuron_masks=p.enabled and p.prune_neurons)
    try:
        state = safe_load(path / "best_model.pt")  # weights only: a planted pickle is refused, not run
    except pickle.UnpicklingError:
        raise DeployError(f"{path}/best_model.pt is not loadable: it holds objects other than tensors, "
                          f"which are never unpickled") from None
    except Exception as exc:  # truncated, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DeployError(f"{path}/best_model.pt is not loadable ({type(exc).__name__}: {first})") from None
    try:
        net.load_state_dict(state)
    except (RuntimeError, OSError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployError(f"{path}/best_model.pt does not fit the config's network: {first}") from None
    if p.enabled:
        masks = path / "masks.spm"
        if not masks.is_file():
            raise DeployError(f"{path}: pruned run without masks.spm (no hardened network)")
        before = {n: (m.logits.detach() > 0).clone() for n, m in masked_modules(net) if m.logits is not None}
        try:
            load_masks(net, masks, cfg.model.name)
        except MaskError as exc:
            raise DeployError(str(exc)) from None
        for n, m in masked_modules(net):
            if n in before and not torch.equal(before[n], m.logits.detach() > 0):
                raise DeployError(f"{masks}: mask {n} differs from best_model.pt's (files from two runs?)")
        set_mask_mode(net, "hard")
    else:
        set_mask_mode(net, "off")
    net.eval()
    results = json.loads((path / "results.json").read_text())
    energy_path = path / "energy_report.json"
    energy = json.loads(energy_path.read_text()) if energy_path.is_file() else {}
    return Run(path=path, cfg=cfg, net=net, results=results, energy=energy)
