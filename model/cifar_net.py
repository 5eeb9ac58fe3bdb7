"""CIFAR-10 "6Conv2FC" (docs/METHOD.md §2): 36,715,264 weights at width 1, T = 8, LIF, vote 100 -> 10."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.base import SpikingNet, scaled, sequential_consumers, vote
from model.layers import ConvBNSpike, LinearSpike, SeqPool, StaticConvBNSpike


class Cifar6Conv2FC(SpikingNet):
    def __init__(self, num_classes: int = 10, T: int = 8, width: float = 1.0, input_size: int = 32,
                 weight_masks: bool = True, neuron_masks: bool = True, in_channels: int = 3):
        super().__init__()
        c, hidden = scaled(256, width), scaled(2048, width)
        self.T, self.num_classes = T, num_classes
        self.input_shape = (in_channels, input_size, input_size)
        conv = dict(neuron="lif", weight_mask=weight_masks, neuron_mask=neuron_masks)
        self.stem = StaticConvBNSpike(in_channels, c, 3, neuron="lif", weight_mask=weight_masks, T=T)
        self.stage1 = nn.Sequential(ConvBNSpike(c, c, 3, **conv), ConvBNSpike(c, c, 3, **conv))
        self.pool1 = SeqPool("max", 2)
        self.stage2 = nn.Sequential(*[ConvBNSpike(c, c, 3, **conv) for _ in range(3)])
        self.pool2 = SeqPool("max", 2)
        flat = c * (input_size // 4) ** 2
        self.fc1 = LinearSpike(flat, hidden, "lif", weight_masks)
        self.fc2 = LinearSpike(hidden, num_classes * 10, "lif", weight_masks)
        self.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.stage1(self.stem(x)))
        h = self.pool2(self.stage2(h))
        return vote(self.fc2(self.fc1(h.flatten(2))), self.num_classes)

    def consumers(self):
        return sequential_consumers([self.stem, *self.stage1, *self.stage2, self.fc1, self.fc2])

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE between the firing rate of the vote and the one-hot label (the reference's loss)."""
        target = nn.functional.one_hot(y, self.num_classes).to(out.dtype)
        return nn.functional.mse_loss(self.logits(out), target)
