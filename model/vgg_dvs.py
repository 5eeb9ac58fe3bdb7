"""DVS-CIFAR10 "VGGSNN" (docs/METHOD.md §2): 9,677,952 weights at width 1, T = 10, input [N, T, 2, 48, 48]."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.base import SpikingNet, scaled, sequential_consumers, vote
from model.layers import ConvBNSpike, LinearSpike, SeqPool

# (out channels, pool after) for the 8 convs; "A" = 2x2 average pooling.
_PLAN = [(64, ""), (128, "A"), (256, ""), (256, "A"), (512, ""), (512, "A"), (512, ""), (512, "A")]


class VGGSNN(SpikingNet):
    def __init__(self, num_classes: int = 10, T: int = 10, width: float = 1.0, input_size: int = 48,
                 weight_masks: bool = True, neuron_masks: bool = True, in_channels: int = 2):
        super().__init__()
        self.T, self.num_classes = T, num_classes
        self.input_shape = (T, in_channels, input_size, input_size)
        layers, self.convs = [], []
        c_in = in_channels
        for i, (c, pool) in enumerate(_PLAN):
            c = scaled(c, width)
            # the first conv sees event frames: weight mask only, MACs rather than SOPs
            block = ConvBNSpike(c_in, c, 3, neuron="lif", weight_mask=weight_masks,
                                neuron_mask=neuron_masks and i > 0, counted=i > 0)
            layers.append(block)
            self.convs.append(block)
            if pool:
                layers.append(SeqPool("avg", 2))
            c_in = c
        self.features = nn.Sequential(*layers)
        side = input_size // 16
        self.fc = LinearSpike(c_in * side * side, num_classes * 10, neuron=None, weight_mask=weight_masks)
        self.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.transpose(0, 1))
        return vote(self.fc(h.flatten(2)), self.num_classes)

    def consumers(self):
        return sequential_consumers([*self.convs, self.fc])

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """TET: the cross-entropy at every time step, averaged over T."""
        return nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
