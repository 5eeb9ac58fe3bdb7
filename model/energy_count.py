"""Exact counting (docs/METHOD.md §5, docs/ENERGY.md): SOPs, synaptic events, spikes, neuron
updates and first-layer MACs per sample, and firing rates.

SOPs of a counted layer = sum over t, n, inputs i and kept post-neurons j of
input_i[t, n] * keep_w(i -> j). Running a second (0/1-kernel) conv per batch would double the
cost of an eval pass, so `SOPCounter` only accumulates each counted layer's input summed over
(T*N) slices, a [C, H, W] or [F] tensor, and at report time takes its dot product with a
static fan-out map: the number of kept synapses from each input position to kept
post-neurons. The sum is linear in the input, so the two orders give the same number. The
synaptic events (a nonzero input times its kept fan-out, whatever its value) and the graded
ones (inputs neither 0 nor 1: SEW sums, pooled averages) are the same dot product with the
summed maps of nonzero and of graded inputs.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.energy_report import PJ_PER_MAC, PJ_PER_SOP, EnergyReport, LayerReport
from model.masks import (MaskedConv2d, MaskedLinear, MaskError, keep_ratios, mask_mode,
                         masked_modules, weight_layers)
from model.neurons import MultiStepIF
from model.structure import connectivity


def layer_kind(layer: MaskedConv2d | MaskedLinear) -> str:
    """'fc', or 'conv3x3' with '/2' appended for a stride of 2."""
    if isinstance(layer, MaskedLinear):
        return "fc"
    (kh, kw), (s, _) = layer.kernel_size, layer.stride
    return f"conv{kh}x{kw}" + (f"/{s}" if s > 1 else "")


def fanout_map(layer: MaskedConv2d | MaskedLinear, post_keep: torch.Tensor) -> torch.Tensor:
    """Kept synapses from each input position ([C, H, W] or [F], float64, CPU) to kept
    post-neurons (`post_keep` [C_out, H_out, W_out] or [F_out], bool), under `layer.keep()`.

    For a conv it is the transposed conv of the post-keep map with the 0/1 kernel, cropped
    like the forward conv's padding; padding positions have no neuron and drop out.
    """
    w = layer.keep().to("cpu", torch.float64)
    post = post_keep.to("cpu", torch.float64)
    if isinstance(layer, MaskedLinear):
        return post @ w
    # output_padding recovers the input rows a strided conv skips at the far edge
    out_pad = tuple(n - ((o - 1) * s - 2 * p + k) for n, o, s, p, k in
                    zip(layer.in_hw, layer.out_hw, layer.stride, layer.padding, layer.kernel_size))
    return F.conv_transpose2d(post.unsqueeze(0), w, stride=layer.stride, padding=layer.padding,
                              output_padding=out_pad, dilation=layer.dilation)[0]


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 accumulation at least: a half-precision sum rounds counts above 256 / 2048."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same elements (one is a reshaped view of the other)."""
    return (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
            and a.is_contiguous() and b.is_contiguous())


def _owners(net: nn.Module) -> dict[nn.Module, tuple[str, nn.Module]]:
    """Weight layer -> (name, module) of the block that holds it (its neuron, neuron mask)."""
    out = {}
    for name, mod in net.named_modules():
        for child in mod.children():
            if isinstance(child, (MaskedConv2d, MaskedLinear)):
                out[child] = (name, mod)
    return out


def _post_keep(layer: MaskedConv2d | MaskedLinear, owner: nn.Module) -> torch.Tensor:
    nmask = getattr(owner, "nmask", None)
    if nmask is not None:
        return nmask.keep()
    if isinstance(layer, MaskedLinear):
        return torch.ones(layer.out_features, dtype=torch.bool)
    return torch.ones((layer.out_channels, *layer.out_hw), dtype=torch.bool)


class SOPCounter:
    """Counts SOPs, synaptic events, spikes, neuron updates, firing rates and first-layer MACs
    of eval passes run inside `with`.

    Masks must be hard (or off, for a dense reference): soft gates have no exact SOP count.
    The masks' structure is read once on entry; per batch, each counted layer only adds its
    input summed over (T*N) into an accumulator (no second conv, no host sync).

        with torch.no_grad(), SOPCounter(net) as counter:
            for x, _ in batches:
                net(x)
        report = counter.report()
    """

    def __init__(self, net: nn.Module):
        self.net = net
        self.samples = 0
        self._handles: list = []

    def __enter__(self) -> SOPCounter:
        """Start a fresh count: read the masks' structure and hook the net."""
        soft = [name for name, m in masked_modules(self.net) if m.logits is not None and m.mode == "soft"]
        if soft:
            raise MaskError(f"SOPCounter needs hard (or off) masks, {soft[0]} is soft: "
                            "call masks.set_mask_mode(net, 'hard') first")
        self.samples = 0
        self._inputs: dict[str, torch.Tensor] = {}
        self._nonzero: dict[str, torch.Tensor] = {}
        self._graded: dict[str, torch.Tensor] = {}
        self._slices: dict[str, int] = {}
        self._spikes: dict[str, torch.Tensor] = {}
        self._elements: dict[str, int] = {}
        self._pending: tuple[str, torch.Tensor] | None = None
        self._snapshot()
        self._handles.append(self.net.register_forward_pre_hook(self._count_samples))
        self._handles.append(self.net.register_forward_hook(lambda *_: self._settle()))
        for name, layer in weight_layers(self.net):
            if layer.counted:
                self._handles.append(layer.register_forward_pre_hook(self._sum_input(name, layer)))
            elif name in self._first:
                self._handles.append(layer.register_forward_pre_hook(self._count_slices(name)))
        for block_name, block in self._blocks.items():
            self._handles.append(block.register_forward_hook(self._sum_spikes(block_name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending = None

    def _snapshot(self) -> None:
        """Everything static: fan-out maps, keeps, connectivity, which layers are 'first'."""
        net = self.net
        conn = connectivity(net)  # also refreshes every layer's in_hw / out_hw
        # a dense reference run (every mask off) is measured as the dense network it is
        dense_run = all(m.mode == "off" for _, m in masked_modules(net) if m.logits is not None)
        live = conn.dense if dense_run else conn.live
        self.weight_keep, self.neuron_keep = (1.0, 1.0) if dense_run else keep_ratios(net)
        owners = _owners(net)
        layers = weight_layers(net)
        first_counted = next((i for i, (_, lay) in enumerate(layers) if lay.counted), len(layers))
        # the first layer sees pixels / event frames: it costs MACs, not SOPs
        self._first = {name for name, lay in layers[:first_counted] if not lay.counted}
        self._layers, self._fanout, self._rate_of, self._blocks = [], {}, {}, {}
        for name, layer in layers:
            owner_name, owner = owners[layer]
            post_keep = _post_keep(layer, owner)
            if layer.counted:
                self._fanout[name] = fanout_map(layer, post_keep)
            if getattr(owner, "neuron", None) is not None:
                self._rate_of[name] = owner_name
                self._blocks[owner_name] = owner
            in_elements = (layer.in_features if isinstance(layer, MaskedLinear)
                           else layer.in_channels * layer.in_hw[0] * layer.in_hw[1])
            self._layers.append(dict(
                name=name, kind=layer_kind(layer), counted=layer.counted,
                kept_weights=int(layer.keep().sum()), total_weights=layer.weight.numel(),
                kept_neurons=int(post_keep.sum()), total_neurons=post_keep.numel(),
                live_connections=live[name], dense_connections=conn.dense[name],
                input_elements=in_elements,
                leaky=getattr(owner, "neuron", None) is not None and not isinstance(owner.neuron, MultiStepIF)))

    def _count_samples(self, module, args) -> None:
        self.samples += args[0].shape[0]

    def _sum_input(self, name: str, layer: nn.Module):
        feature_dims = 3 if isinstance(layer, MaskedConv2d) else 1

        def hook(module, args):
            x = args[0].detach()
            # per batch, float32 holds spike counts exactly (up to 2^24 per position); across
            # a whole eval set the float64 accumulator does
            dims = tuple(range(x.dim() - feature_dims))
            s = x.sum(dims, dtype=_sum_dtype(x))
            self._accumulate(self._inputs, name, s)
            nonzero = x != 0
            self._accumulate(self._nonzero, name, nonzero.sum(dims, dtype=torch.float32))
            self._accumulate(self._graded, name, (nonzero & (x != 1)).sum(dims, dtype=torch.float32))
            if self._pending is not None and _same_memory(x, self._pending[1]):
                self._add_spikes(self._pending[0], s.sum())
                self._pending = None
        return hook

    @staticmethod
    def _accumulate(into: dict[str, torch.Tensor], name: str, s: torch.Tensor) -> None:
        acc = into.get(name)
        into[name] = s.double() if acc is None else acc.add_(s)

    def _count_slices(self, name: str):
        def hook(module, args):
            self._slices[name] = self._slices.get(name, 0) + args[0].shape[0]
        return hook

    def _sum_spikes(self, block: str):
        """A block's spike total: most outputs are the very tensor the next counted layer reads,
        whose input sum gives it for free; the rest are summed when the next block finishes."""
        def hook(module, args, out):
            self._settle()
            self._pending = (block, out.detach())
            self._elements[block] = self._elements.get(block, 0) + out.numel()
        return hook

    def _settle(self) -> None:
        if self._pending is not None:
            block, out = self._pending
            self._add_spikes(block, out.sum(dtype=_sum_dtype(out)))
            self._pending = None

    def _add_spikes(self, block: str, total: torch.Tensor) -> None:
        acc = self._spikes.get(block)
        self._spikes[block] = total.double() if acc is None else acc.add_(total)

    def report(self, *, dense_reference_sops: float | None = None, pj_per_sop: float = PJ_PER_SOP,
               pj_per_mac: float = PJ_PER_MAC) -> EnergyReport:
        if self.samples == 0:
            raise ValueError("SOPCounter saw no samples: run the net inside the `with` block first")
        rows = []
        for row in self._layers:
            name = row["name"]
            sops = macs = dense_macs = events = graded = input_events = 0.0
            if name in self._fanout and name in self._inputs:
                acc, fan = self._inputs[name].cpu(), self._fanout[name]
                if acc.shape != fan.shape:
                    raise ValueError(f"{name} saw inputs of shape {tuple(acc.shape)} per slice, the "
                                     f"net's structure (input_shape) gives {tuple(fan.shape)}")
                sops = float((acc * fan).sum()) / self.samples
                nonzero = self._nonzero[name].cpu()
                events = float((nonzero * fan).sum()) / self.samples
                graded = float((self._graded[name].cpu() * fan).sum()) / self.samples
                input_events = float(nonzero.sum()) / self.samples
            if name in self._first:
                macs = row["live_connections"] * self._slices.get(name, 0) / self.samples
                dense_macs = row["dense_connections"] * self._slices.get(name, 0) / self.samples
            block = self._rate_of.get(name)
            rate, spikes, updates = None, 0.0, 0.0
            if block is not None and self._elements.get(block):
                rate = float(self._spikes[block].cpu()) / self._elements[block]
                spikes = float(self._spikes[block].cpu()) / self.samples
                updates = self._elements[block] / self.samples
            rows.append(LayerReport(
                sops_per_sample=sops, macs_per_sample=macs, firing_rate=rate, synaptic_events_per_sample=events,
                graded_events_per_sample=graded, input_events_per_sample=input_events,
                spikes_per_sample=spikes, neuron_updates_per_sample=updates,
                live_neuron_updates_per_sample=updates * row["kept_neurons"] / row["total_neurons"],
                dense_macs_per_sample=dense_macs, **row))
        return EnergyReport(layers=rows, samples=self.samples, weight_keep=self.weight_keep,
                            neuron_keep=self.neuron_keep, dense_reference_sops=dense_reference_sops,
                            pj_per_sop=pj_per_sop, pj_per_mac=pj_per_mac)


def measure_energy(net: nn.Module, batches: Iterable, *, max_batches: int | None = None,
                   dense_reference_sops: float | None = None,
                   device: torch.device | str | None = None) -> EnergyReport:
    """Energy report of `net` with hard masks over (x, y) batches; the net's train/eval state and
    mask modes are restored afterwards. `device` defaults to the net's parameters' device."""
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    try:
        net.eval()
        with mask_mode(net, "hard"), torch.no_grad(), SOPCounter(net) as counter:
            for i, (x, *_) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                net(x.to(device, non_blocking=True))
    finally:
        net.train(was_training)
    return counter.report(dense_reference_sops=dense_reference_sops)
