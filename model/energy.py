"""The energy report (docs/METHOD.md §5): exact SOPs per sample, first-layer MACs, energy in pJ.

SOPs of a counted layer = sum over t, n, inputs i and kept post-neurons j of
input_i[t, n] * keep_w(i -> j). Running a second (0/1-kernel) conv per batch would double the
cost of an eval pass, so `SOPCounter` only accumulates each counted layer's input summed over
(T*N) slices, a [C, H, W] or [F] tensor, and at report time takes its dot product with a
static fan-out map: the number of kept synapses from each input position to kept
post-neurons. The sum is linear in the input, so the two orders give the same number.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.masks import (MaskedConv2d, MaskedLinear, MaskError, keep_ratios, masked_modules,
                         set_mask_mode, weight_layers)
from model.structure import connectivity

PJ_PER_SOP = 0.9   # 45 nm accumulate (docs/METHOD.md §5)
PJ_PER_MAC = 4.6   # 45 nm multiply-accumulate, first layer only
REPORT_NAME = "energy_report.json"


@dataclass
class LayerReport:
    """One weight layer. Connections are per time step and sample (padding excluded);
    neurons are the layer's post-neurons (its block's neuron mask, or its output features)."""

    name: str
    kind: str
    counted: bool
    sops_per_sample: float
    macs_per_sample: float
    firing_rate: float | None
    kept_weights: int
    total_weights: int
    kept_neurons: int
    total_neurons: int
    live_connections: float
    dense_connections: float


@dataclass
class EnergyReport:
    """Per-layer rows and totals of one measured eval pass; totals are derived from the rows
    so that changing `pj_per_sop` / `pj_per_mac` re-prices the same measurement."""

    layers: list[LayerReport]
    samples: int
    weight_keep: float
    neuron_keep: float
    dense_reference_sops: float | None = None
    pj_per_sop: float = PJ_PER_SOP
    pj_per_mac: float = PJ_PER_MAC

    @property
    def sops_per_sample(self) -> float:
        return sum(r.sops_per_sample for r in self.layers)

    @property
    def first_layer_macs_per_sample(self) -> float:
        return sum(r.macs_per_sample for r in self.layers)

    @property
    def sop_energy_pj_per_sample(self) -> float:
        return self.pj_per_sop * self.sops_per_sample

    @property
    def energy_pj_per_sample(self) -> float:
        return self.sop_energy_pj_per_sample + self.pj_per_mac * self.first_layer_macs_per_sample

    @property
    def energy_ratio(self) -> float | None:
        """Dense reference SOPs / ours; None without a reference or when we spend no SOPs."""
        if self.dense_reference_sops is None or self.sops_per_sample == 0:
            return None
        return self.dense_reference_sops / self.sops_per_sample

    @property
    def connectivity(self) -> float:
        dense = sum(r.dense_connections for r in self.layers)
        return sum(r.live_connections for r in self.layers) / dense if dense else 1.0

    @property
    def connectivity_pct(self) -> float:
        return 100.0 * self.connectivity

    def totals(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples,
            "sops_per_sample": self.sops_per_sample,
            "first_layer_macs_per_sample": self.first_layer_macs_per_sample,
            "sop_energy_pj_per_sample": self.sop_energy_pj_per_sample,
            "energy_pj_per_sample": self.energy_pj_per_sample,
            "dense_reference_sops": self.dense_reference_sops,
            "energy_ratio": self.energy_ratio,
            "connectivity": self.connectivity,
            "connectivity_pct": self.connectivity_pct,
            "weight_keep": self.weight_keep,
            "neuron_keep": self.neuron_keep,
            "pj_per_sop": self.pj_per_sop,
            "pj_per_mac": self.pj_per_mac,
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: the totals plus per-layer SOPs and firing rates."""
        out = {k: float(v) for k, v in self.totals().items() if v is not None}
        for r in self.layers:
            if r.counted:
                out[f"sops_per_sample/{r.name}"] = r.sops_per_sample
            if r.firing_rate is not None:
                out[f"firing_rate/{r.name}"] = r.firing_rate
        return out

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the report (a directory gets `energy_report.json`) atomically; return the path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_NAME)
        doc = {**self.totals(), "layers": [asdict(r) for r in self.layers]}
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EnergyReport:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_NAME)
        with open(path) as f:
            doc = json.load(f)
        names = {f.name for f in fields(cls)} - {"layers"}
        return cls(layers=[LayerReport(**r) for r in doc["layers"]],
                   **{k: v for k, v in doc.items() if k in names})

    def table(self) -> str:
        """The report as an aligned terminal table with a totals line and a summary."""
        head = ["layer", "kind", "SOPs/sample", "MACs/sample", "rate", "weights kept",
                "neurons kept", "connections live/dense"]
        rows = [[r.name, r.kind + ("" if r.counted else "*"), _si(r.sops_per_sample),
                 _si(r.macs_per_sample) if r.macs_per_sample else "-",
                 "-" if r.firing_rate is None else f"{r.firing_rate:.4f}",
                 _kept(r.kept_weights, r.total_weights), _kept(r.kept_neurons, r.total_neurons),
                 f"{_si(r.live_connections)}/{_si(r.dense_connections)}"] for r in self.layers]

        def sum_of(attr: str) -> float:
            return sum(getattr(r, attr) for r in self.layers)
        rows.append(["total", "", _si(self.sops_per_sample), _si(self.first_layer_macs_per_sample), "",
                     _kept(sum_of("kept_weights"), sum_of("total_weights")),
                     _kept(sum_of("kept_neurons"), sum_of("total_neurons")),
                     f"{_si(sum_of('live_connections'))}/{_si(sum_of('dense_connections'))}"])
        lines = aligned(head, rows)
        lines[-1:-1] = [lines[1]]  # a rule above the totals line
        lines.append("")
        lines.append(f"energy/sample {_si(self.energy_pj_per_sample)}pJ = "
                     f"{_si(self.sops_per_sample)} SOPs x {self.pj_per_sop} pJ + "
                     f"{_si(self.first_layer_macs_per_sample)} first-layer MACs x {self.pj_per_mac} pJ")
        lines.append(f"connectivity {self.connectivity_pct:.4g} %  weight keep "
                     f"{100 * self.weight_keep:.4g} %  neuron keep {100 * self.neuron_keep:.4g} %  "
                     f"samples {self.samples}")
        if self.energy_ratio is not None:
            lines.append(f"dense reference {_si(self.dense_reference_sops)} SOPs/sample: "
                         f"{self.energy_ratio:.3g}x fewer SOPs")
        lines.append("* not counted in SOPs (first layer: MACs; head: neither)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> str:
        """Per-layer bar chart (PNG): SOPs per sample, and kept weights / neurons in %."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [r.name for r in self.layers]
        x = list(range(len(names)))
        fig = Figure(figsize=(max(8.0, 0.4 * len(names) + 2), 7.5))
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.bar(x, [r.sops_per_sample for r in self.layers], color="tab:blue", label="SOPs / sample")
        if self.first_layer_macs_per_sample:
            top.bar(x, [r.macs_per_sample for r in self.layers], color="tab:red",
                    label="first-layer MACs / sample")
        top.set_ylabel("operations / sample")
        top.set_title(f"{_si(self.sops_per_sample)} SOPs/sample, {_si(self.energy_pj_per_sample)}pJ/sample, "
                      f"connectivity {self.connectivity_pct:.3g} %")
        top.legend(fontsize=8)
        width = 0.4
        bottom.bar([i - width / 2 for i in x], [_pct(r.kept_weights, r.total_weights) for r in self.layers],
                   width, color="tab:green", label="weights kept")
        bottom.bar([i + width / 2 for i in x], [_pct(r.kept_neurons, r.total_neurons) for r in self.layers],
                   width, color="tab:orange", label="neurons kept")
        bottom.set_ylim(0, 105)
        bottom.set_ylabel("kept (%)")
        bottom.legend(fontsize=8)
        bottom.set_xticks(x)
        bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        fig.tight_layout()
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
        return path


def aligned(head: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Lines of a text table: header, rule, rows; the first `left` columns left-aligned."""
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), "-" * len(line(head)), *map(line, rows)]


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


def _pct(kept: int, total: int) -> float:
    return 100.0 * kept / total if total else 100.0


def _kept(kept: int, total: int) -> str:
    return f"{kept}/{total} ({_pct(kept, total):.3g}%)"


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
    """Counts SOPs, firing rates and first-layer MACs of eval passes run inside `with`.

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
            self._layers.append(dict(
                name=name, kind=layer_kind(layer), counted=layer.counted,
                kept_weights=int(layer.keep().sum()), total_weights=layer.weight.numel(),
                kept_neurons=int(post_keep.sum()), total_neurons=post_keep.numel(),
                live_connections=live[name], dense_connections=conn.dense[name]))

    def _count_samples(self, module, args) -> None:
        self.samples += args[0].shape[0]

    def _sum_input(self, name: str, layer: nn.Module):
        feature_dims = 3 if isinstance(layer, MaskedConv2d) else 1

        def hook(module, args):
            x = args[0].detach()
            # per batch, float32 holds spike counts exactly (up to 2^24 per position); across
            # a whole eval set the float64 accumulator does
            s = x.sum(tuple(range(x.dim() - feature_dims)), dtype=_sum_dtype(x))
            acc = self._inputs.get(name)
            self._inputs[name] = s.double() if acc is None else acc.add_(s)
            if self._pending is not None and _same_memory(x, self._pending[1]):
                self._add_spikes(self._pending[0], s.sum())
                self._pending = None
        return hook

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
            sops = macs = 0.0
            if name in self._fanout and name in self._inputs:
                acc, fan = self._inputs[name].cpu(), self._fanout[name]
                if acc.shape != fan.shape:
                    raise ValueError(f"{name} saw inputs of shape {tuple(acc.shape)} per slice, the "
                                     f"net's structure (input_shape) gives {tuple(fan.shape)}")
                sops = float((acc * fan).sum()) / self.samples
            if name in self._first:
                macs = row["live_connections"] * self._slices.get(name, 0) / self.samples
            block = self._rate_of.get(name)
            rate = None
            if block is not None and self._elements.get(block):
                rate = float(self._spikes[block].cpu()) / self._elements[block]
            rows.append(LayerReport(sops_per_sample=sops, macs_per_sample=macs, firing_rate=rate, **row))
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
    modes = {name: m.mode for name, m in masked_modules(net)}
    was_training = net.training
    try:
        net.eval()
        set_mask_mode(net, "hard")
        with torch.no_grad(), SOPCounter(net) as counter:
            for i, (x, *_) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                net(x.to(device, non_blocking=True))
    finally:
        for name, m in masked_modules(net):
            m.mode = modes[name]
        net.train(was_training)
    return counter.report(dense_reference_sops=dense_reference_sops)
