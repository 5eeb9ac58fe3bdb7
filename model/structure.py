"""Structural pass: propagate an alive map through the net (docs/METHOD.md §5, connectivity).

A position is alive if it has >= 1 live input connection and its neuron mask keeps it;
max-pool is OR, average pooling averages (the fraction weights the next layer's count),
padding contributes nothing, SEW shortcut maps add (the sum, 2, 3, ..., weights the next
layer's count), as the reference's `connects()` counts (docs/METHOD.md). The same pass sizes the
lazily built neuron masks and records every weight layer's input size (used by e_w).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from model.masks import mask_mode, weight_layers


@contextmanager
def _structural(net: nn.Module):
    blocks = [m for m in net.modules() if hasattr(m, "structural")]
    for b in blocks:
        b.structural = True
    try:
        yield
    finally:
        for b in blocks:
            b.structural = False


@torch.no_grad()
def structural_pass(net: nn.Module) -> dict[str, float]:
    """Live connections per time step and sample, per weight layer, under the current masks."""
    with _structural(net):
        device = next(net.parameters()).device
        net(torch.ones((1, *net.input_shape), device=device))
    return {name: layer.live_connections for name, layer in weight_layers(net)}


@dataclass
class Connectivity:
    live: dict[str, float]
    dense: dict[str, float]

    @property
    def live_total(self) -> float:
        return sum(self.live.values())

    @property
    def dense_total(self) -> float:
        return sum(self.dense.values())

    @property
    def ratio(self) -> float:
        return self.live_total / self.dense_total


@torch.no_grad()
def connectivity(net: nn.Module) -> Connectivity:
    """Surviving vs dense connections, with hard masks (masks' modes are restored after)."""
    with mask_mode(net, "hard"):
        live = structural_pass(net)
    with mask_mode(net, "off"):
        dense = structural_pass(net)
    return Connectivity(live, dense)
