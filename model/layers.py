"""Spiking building blocks shared by the networks: conv+BN+neuron(+neuron mask), FC+neuron.

Every block runs multi-step on x_seq [T, N, ...]. Each block also has a *structural* forward
(`structural=True`, set by `model.structure.structural_pass`): it propagates a 0/1 "alive" map
instead of activations and records live connections per layer, which gives connectivity,
the layers' input sizes and the neuron masks' shapes without per-network bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.masks import MaskedConv2d, MaskedLinear, NeuronMask
from model.neurons import MultiStepIF, MultiStepLIF


def make_neuron(kind: str) -> nn.Module:
    if kind == "lif":
        return MultiStepLIF(tau=2.0, v_threshold=1.0, detach_reset=True)
    if kind == "if":
        return MultiStepIF(v_threshold=1.0, detach_reset=True)
    raise ValueError(f"unknown neuron kind {kind!r} (expected 'lif' or 'if')")


def _record(layer, a_in: torch.Tensor, count: torch.Tensor, post_keep: torch.Tensor,
            in_connectivity: bool = True) -> torch.Tensor:
    """Store one layer's structural figures; return the alive map of its outputs.

    count[..., j] = sum over inputs i of a_i x keep_w(i -> j), where the arriving map a is not
    thresholded: an average-pooled map weights by its fraction, a SEW sum by its multiplicity
    (docs/METHOD.md, connectivity). Connections are counted only into kept post-neurons, per
    time step and sample; the output map is 0/1. A layer left out of connectivity (the SEW
    head, as in the reference) records 0.
    """
    slices = a_in.shape[0]
    post_keep = post_keep.to(count.device)
    live = count * post_keep.to(count.dtype)
    layer.live_connections = float(live.sum()) / slices if in_connectivity else 0.0
    return ((count > 0) & post_keep).to(count.dtype)


class ConvBNSpike(nn.Module):
    """conv (weight mask) -> BN over T*N -> spiking neuron -> neuron mask on its spikes."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int | None = None,
                 neuron: str = "lif", weight_mask: bool = True, neuron_mask: bool = True,
                 counted: bool = True):
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        self.conv = MaskedConv2d(in_ch, out_ch, kernel, stride, padding, weight_mask, counted)
        self.bn = nn.BatchNorm2d(out_ch)
        self.neuron = make_neuron(neuron)
        self.nmask = NeuronMask(enabled=neuron_mask)
        self.structural = False

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T, N = x_seq.shape[:2]
        if self.structural:
            a = x_seq.flatten(0, 1).to(torch.float32)
            count = F.conv2d(a, self.conv.keep().float(), None, self.conv.stride, self.conv.padding)
            self.conv.in_hw, self.conv.out_hw = tuple(a.shape[-2:]), tuple(count.shape[-2:])
            self.nmask.materialize(count.shape[1:])
            return _record(self.conv, a, count, self.nmask.keep()).unflatten(0, (T, N))
        y = self.bn(self.conv(x_seq.flatten(0, 1)))
        return self.nmask(self.neuron(y.unflatten(0, (T, N))))


class StaticConvBNSpike(ConvBNSpike):
    """Direct encoding: conv+BN run once on the image [N, C, H, W], repeated T times, then fire.

    Not counted in SOPs (its inputs are pixels: MACs, reported separately) and without a
    neuron mask, as the paper's first layer / SEW stem.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int | None = None,
                 neuron: str = "lif", weight_mask: bool = True, T: int = 4):
        super().__init__(in_ch, out_ch, kernel, stride, padding, neuron, weight_mask,
                         neuron_mask=False, counted=False)
        self.T = T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.structural:
            return super().forward(x.unsqueeze(0))
        y = self.bn(self.conv(x))
        return self.neuron(y.unsqueeze(0).expand(self.T, *y.shape).contiguous())


class LinearSpike(nn.Module):
    """FC layer over [T, N, F] with a weight mask only; a neuron unless it is a real-valued output."""

    def __init__(self, in_f: int, out_f: int, neuron: str | None = "lif", weight_mask: bool = True,
                 counted: bool = True, bias: bool = False, in_connectivity: bool = True):
        super().__init__()
        self.fc = MaskedLinear(in_f, out_f, weight_mask, counted, bias=bias)
        self.neuron = make_neuron(neuron) if neuron else None
        self.in_connectivity = in_connectivity
        self.structural = False

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.structural:
            a = x_seq.flatten(0, 1).to(torch.float32)
            count = a @ self.fc.keep().float().t()
            keep = torch.ones(count.shape[1:], dtype=torch.bool)
            return _record(self.fc, a, count, keep, self.in_connectivity).unflatten(0, x_seq.shape[:2])
        y = self.fc(x_seq)
        return self.neuron(y) if self.neuron is not None else y


class SeqPool(nn.Module):
    """2-D pooling applied to every time step of [T, N, C, H, W]."""

    def __init__(self, kind: str, kernel: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[kind]
        self.pool = pool(kernel, stride, padding)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.pool(x_seq.flatten(0, 1)).unflatten(0, x_seq.shape[:2])
