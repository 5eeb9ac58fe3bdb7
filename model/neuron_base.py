"""The short path to a new neuron model: subclass `MultiStepNeuron`, override `charge`.

`MultiStepNeuron` runs the time loop in plain PyTorch and lets autograd do the BPTT, the way
SpikingJelly's `neuron_charge` override works. It is several times slower than the fused
kernels of model/neurons.py (one Python step per time step, every intermediate kept for
backward), so a model that proves itself gets a fused charge rule there: the steps are in
docs/DESIGN.md, "Adding a neuron model"; tests/test_neuron_template.py is the test to copy.
"""

from __future__ import annotations

import torch
from torch import nn

from model.surrogate import ALPHA, atan_spike


class MultiStepNeuron(nn.Module):
    """x_seq [T, N, ...] -> spikes [T, N, ...]: charge, fire at `v_threshold` (ATan surrogate),
    hard reset to `v_reset`; V starts at v_reset on every call, as the fused neurons."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float = 0.0, detach_reset: bool = True,
                 alpha: float = ALPHA):
        super().__init__()
        self.v_threshold, self.v_reset = float(v_threshold), float(v_reset)
        self.detach_reset, self.alpha = detach_reset, float(alpha)

    def charge(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The membrane potential after input x arrives at potential v (the one method a new
        model overrides)."""
        raise NotImplementedError

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        v = torch.full_like(x_seq[0], self.v_reset)
        spikes = []
        for x in x_seq:
            h = self.charge(v, x)
            s = atan_spike(h - self.v_threshold, self.alpha)
            gate = s.detach() if self.detach_reset else s
            v = h * (1 - gate) + self.v_reset * gate
            spikes.append(s)
        return torch.stack(spikes)
