"""SEW-ResNet-18/34/50 with ADD connect function and IF neurons (docs/METHOD.md §2), T = 4.

Every block conv and downsample conv carries a weight and a neuron mask; the stem and the
head are neither pruned nor counted. The Bottleneck (SEW-ResNet-50) is pruned as well.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.base import SpikingNet, scaled
from model.layers import ConvBNSpike, LinearSpike, SeqPool, StaticConvBNSpike


class _SEWBlock(nn.Module):
    """out = spikes of the last ConvBNSpike + identity (or the downsample's spikes)."""

    expansion = 1

    def __init__(self, convs: list[ConvBNSpike], downsample: ConvBNSpike | None):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.downsample = downsample

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        identity = x_seq if self.downsample is None else self.downsample(x_seq)
        return self.convs(x_seq) + identity

    def entry_layers(self) -> list:
        """Weight layers that read this block's input."""
        first = [self.convs[0].conv]
        return first + ([self.downsample.conv] if self.downsample is not None else [])

    def output_masks(self) -> list:
        """Neuron masks whose spikes leave the block (summed into its output)."""
        out = [self.convs[-1].nmask]
        return out + ([self.downsample.nmask] if self.downsample is not None else [])


def _basic(c_in, planes, stride, masks):
    convs = [ConvBNSpike(c_in, planes, 3, stride, neuron="if", **masks),
             ConvBNSpike(planes, planes, 3, 1, neuron="if", **masks)]
    return convs, planes


def _bottleneck(c_in, planes, stride, masks):
    convs = [ConvBNSpike(c_in, planes, 1, 1, neuron="if", **masks),
             ConvBNSpike(planes, planes, 3, stride, neuron="if", **masks),
             ConvBNSpike(planes, planes * 4, 1, 1, neuron="if", **masks)]
    return convs, planes * 4


_DEPTHS = {18: ([2, 2, 2, 2], _basic), 34: ([3, 4, 6, 3], _basic), 50: ([3, 4, 6, 3], _bottleneck)}


class SEWResNet(SpikingNet):
    def __init__(self, depth: int = 18, num_classes: int = 1000, T: int = 4, width: float = 1.0,
                 input_size: int = 224, weight_masks: bool = True, neuron_masks: bool = True,
                 in_channels: int = 3):
        super().__init__()
        layers_per_stage, make = _DEPTHS[depth]
        self.T, self.num_classes = T, num_classes
        self.input_shape = (in_channels, input_size, input_size)
        masks = dict(weight_mask=weight_masks, neuron_mask=neuron_masks)
        c = scaled(64, width)
        self.stem = StaticConvBNSpike(in_channels, c, 7, 2, 3, neuron="if", weight_mask=False, T=T)
        self.pool = SeqPool("max", 3, 2, 1)
        blocks = []
        for stage, n in enumerate(layers_per_stage):
            planes = scaled(64 * 2 ** stage, width)
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                convs, c_out = make(c, planes, stride, masks)
                down = None
                if stride != 1 or c != c_out:
                    down = ConvBNSpike(c, c_out, 1, stride, 0, neuron="if", **masks)
                blocks.append(_SEWBlock(convs, down))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        # the reference leaves the head out of connectivity too (docs/METHOD.md)
        self.head = LinearSpike(c, num_classes, neuron=None, weight_mask=False, counted=False, bias=True,
                                in_connectivity=False)
        self.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.pool(self.stem(x)))
        h = h.mean((-2, -1))
        return self.head(h)

    def consumers(self):
        """Spikes leaving block b reach every later block's entry layers through identity
        shortcuts, up to and including the next block with a downsample conv."""
        blocks = list(self.blocks)
        out = []
        for b, block in enumerate(blocks):
            convs = list(block.convs)
            for cur, nxt in zip(convs, convs[1:]):
                out.append((cur.nmask, [nxt.conv]))
            reached = []
            for later in blocks[b + 1:]:
                reached += later.entry_layers()
                if later.downsample is not None:
                    break
            out += [(m, reached) for m in block.output_masks()]
        return [(m, layers) for m, layers in out if m.logits is not None and layers]
