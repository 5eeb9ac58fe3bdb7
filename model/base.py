"""What every spikeprune network exposes to training, the penalty and the energy report."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.masks import MaskedConv2d, MaskedLinear, NeuronMask, set_mask_mode
from model.structure import structural_pass


class SpikingNet(nn.Module):
    """Base class. Subclasses build their layers, set `input_shape` (one sample, no batch dim)
    and `T`, implement `forward` -> [T, N, num_classes] and `consumers`, then call `finalize`."""

    input_shape: tuple[int, ...]
    T: int
    num_classes: int

    def finalize(self) -> None:
        """Initialise as the reference does, then size the neuron masks and record layer
        input sizes with one structural pass."""
        init_weights(self)
        set_mask_mode(self, "off")
        structural_pass(self)
        set_mask_mode(self, "soft")

    def consumers(self) -> list[tuple[NeuronMask, list[MaskedConv2d | MaskedLinear]]]:
        """For each neuron mask, the weight layers that receive its spikes (for e_n)."""
        raise NotImplementedError

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """[T, N, K] network output -> [N, K] class scores (rate decoding: mean over T)."""
        return out.mean(0)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(out), y)


def init_weights(net: nn.Module) -> None:
    """The reference's initialisation (docs/METHOD.md §2): every conv and FC weight
    kaiming-normal with mode fan_out for ReLU, std = sqrt(2 / fan_out) (fan_out = C_out k k for a
    conv, out_features for an FC layer); BatchNorm weight 1, bias 0. PyTorch's default would
    leave the FC layers of the CIFAR net silent at the start and make conv steps under Adam
    2.5x larger relative to the weights. Biases (only the SEW head has one) keep PyTorch's
    default."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sequential_consumers(blocks: list[nn.Module]) -> list[tuple[NeuronMask, list]]:
    """Feed-forward chain: each block's spikes go to the next block's weight layer only."""
    out = []
    for cur, nxt in zip(blocks, blocks[1:]):
        if getattr(cur, "nmask", None) is not None and cur.nmask.logits is not None:
            out.append((cur.nmask, [nxt.conv if hasattr(nxt, "conv") else nxt.fc]))
    return out


def vote(out: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voting layer: [.., K*G] -> [.., K], the mean of each class's group of G outputs."""
    return out.unflatten(-1, (num_classes, -1)).mean(-1)


def scaled(channels: int, width: float) -> int:
    """Channels at a width multiplier; a width that leaves no channel is an error."""
    c = int(round(channels * width))
    if c < 1:
        raise ValueError(f"width {width} leaves {channels} channels at 0: use a larger width")
    return c
