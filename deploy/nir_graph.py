"""A hardened spikeprune network as a NIR graph (docs/NIR.md has the mapping and its reasons).

One Euler step of the NIR equations is one time step of our network, with dt = DT seconds:
LIF `tau dv/dt = (v_leak - v) + r I` gives `v += (dt / tau) (v_leak - v + r I)`, so our
`V += (X - V) / 2` is tau = 2 dt, r = 1, v_leak = v_reset = 0; IF `dv/dt = r I` gives
`v += dt r I`, so our `V += X` is r = 1 / dt. DT = 1e-4 s is what snnTorch's importer assumes
(hard-coded) and SpikingJelly's defaults to; Norse takes it as `dt=`.

Every function here returns a graph plus a `NodeMap` that says which of our modules each
spiking node reproduces, so that the round-trip check compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nir
import numpy as np
import torch
import torch.nn as nn

from deploy.fold import fold_conv_bn
from model.cifar_net import Cifar6Conv2FC
from model.layers import ConvBNSpike, LinearSpike, SeqPool
from model.neurons import MultiStepIF, MultiStepLIF
from model.sew_resnet import SEWResNet
from model.vgg_dvs import VGGSNN

DT = 1e-4
# An OR of 0/1 spikes after a sum-pool: v = count / 2 on a LIF at rest, so any count >= 1
# crosses 0.25 and a count of 0 leaves v at 0; v is 0 again after every step.
OR_THRESHOLD = 0.25
MAXPOOL_ENCODINGS = ("sum", "conv")
FIRING_RULES = ("gt", "ge")
AVGPOOL_ENCODINGS = ("sum", "avg")
# Partial neuron masks under a shared-weight conv: "threshold" gives masked neurons
# v_threshold = +inf (compact; Norse reads it); "unroll" keeps every threshold uniform and
# zeroes the masked neurons' outgoing weights, which needs the consumer convs and pools
# unrolled into (mostly zero, gzip-compressed) Linear/Affine nodes from there on, for the
# importers that demand one threshold per node (SpikingJelly, snnTorch).
NEURON_MASK_ENCODINGS = ("threshold", "unroll")
UNROLL_CHUNK = 4096  # one-hot inputs per conv call while unrolling (bounds its memory)


class NIRExportError(ValueError):
    """A network this exporter cannot express exactly; the message names the layer."""


@dataclass
class SpikeNode:
    """A spiking NIR node and the module of ours whose output it must equal.

    `channels` are the output channels of our module that the node keeps (None: all);
    `compare` marks the neurons whose spikes must be identical (our kept neurons); the
    others are silent in NIR and zero after our neuron mask too, or their outgoing weights
    are zero.
    """

    module: str
    channels: np.ndarray | None
    compare: np.ndarray


@dataclass
class NodeMap:
    spiking: dict[str, SpikeNode] = field(default_factory=dict)
    output: str = "output"


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def neuron_node(neuron: nn.Module, threshold: np.ndarray) -> nir.NIRNode:
    """nir.LIF / nir.IF for one of our neurons; `threshold` [shape] is per neuron (float64).

    Parameters are float64 so that tau / dt and 1 / (r dt) come out exactly 2 and 1 in the
    importers that divide them (float32(2e-4) / 1e-4 is not 2).
    """
    shape = threshold.shape
    ones = np.ones(shape)
    if isinstance(neuron, MultiStepLIF):
        v_reset = neuron.v_reset * ones
        # decay_input: V += (X - (V - Vr)) / tau; otherwise V += -(V - Vr) / tau + X, i.e. r = tau.
        r = ones if neuron.decay_input else neuron.tau * ones
        return nir.LIF(tau=neuron.tau * DT * ones, r=r, v_leak=v_reset, v_threshold=threshold,
                       v_reset=v_reset)
    if isinstance(neuron, MultiStepIF):
        return nir.IF(r=ones / DT, v_threshold=threshold, v_reset=neuron.v_reset * ones)
    raise NIRExportError(f"no NIR neuron for {type(neuron).__name__}")


def or_node(shape) -> nir.LIF:
    """The OR after a sum-pool that makes a max-pool of 0/1 spikes exact (see OR_THRESHOLD)."""
    ones = np.ones(tuple(shape))
    return nir.LIF(tau=2 * DT * ones, r=ones, v_leak=0 * ones, v_threshold=OR_THRESHOLD * ones,
                   v_reset=0 * ones)


def _pair(v) -> np.ndarray:
    return np.array([v, v] if np.isscalar(v) else list(v), dtype=np.int64)


def _unrolled(weight: np.ndarray, in_shape, stride, padding, dilation, gate: np.ndarray | None = None
              ) -> np.ndarray:
    """The conv (no bias) of `weight` on [C, H, W] as a dense float32 matrix [C' H' W', C H W]
    in flat C-major order, column j times gate[j] (0/1) when given: the conv of each one-hot
    input, which is exactly the weight (one nonzero product per sum), so the Linear holds the
    conv's every weight bit for bit."""
    w = torch.from_numpy(_f32(weight))
    n = int(np.prod(in_shape))
    m = None
    for start in range(0, n, UNROLL_CHUNK):
        stop = min(n, start + UNROLL_CHUNK)
        eye = torch.zeros(stop - start, n)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        out = nn.functional.conv2d(eye.view(stop - start, *in_shape), w, None, tuple(stride), tuple(padding),
                                   tuple(dilation)).reshape(stop - start, -1)
        if m is None:
            m = np.empty((out.shape[1], n), dtype=np.float32)
        m[:, start:stop] = out.T.numpy()
    if gate is not None:
        m *= gate.reshape(1, -1).astype(np.float32)
    return m


def _pool_out(hw, k, s, p):
    return tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(hw, _pair(k), _pair(s), _pair(p)))


def _one_hot_weight(channels: int, k) -> np.ndarray:
    """Sum-pool as conv weights: channel c's window summed into channel c."""
    w = np.zeros((channels, channels, *_pair(k)), dtype=np.float32)
    w[np.arange(channels), np.arange(channels)] = 1.0
    return w


def _one_hot_conv(channels: int, k, s, p, hw) -> nir.Conv2d:
    """Sum-pool as a conv node (zero padding)."""
    w = _one_hot_weight(channels, k)
    return nir.Conv2d(input_shape=tuple(hw), weight=w, stride=tuple(_pair(s)), padding=tuple(_pair(p)),
                      dilation=(1, 1), groups=1, bias=np.zeros(channels, dtype=np.float32))


class _Graph:
    def __init__(self, input_shape):
        self.nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type=np.array(input_shape))}
        self.edges: list[tuple[str, str]] = []
        self.map = NodeMap()

    def add(self, name: str, node: nir.NIRNode, sources) -> str:
        if name in self.nodes:
            raise NIRExportError(f"duplicate node {name}")
        self.nodes[name] = node
        self.edges += [(s, name) for s in ([sources] if isinstance(sources, str) else sources)]
        return name

    def finish(self, sources, shape, metadata) -> nir.NIRGraph:
        self.add("output", nir.Output(output_type=np.array(shape)), sources)
        return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=metadata)


def _name(path: str) -> str:
    return path.replace(".", "_")


def _thresholds(block, shape, keep: np.ndarray) -> np.ndarray:
    """Per-neuron thresholds: the neuron's own where kept, +inf (never fires) where masked."""
    return np.where(keep, float(block.neuron.v_threshold), np.inf).reshape(shape)


class _Sequential:
    """Builder for the feed-forward nets (6Conv2FC, VGGSNN): dead channels are removed,
    average pools become sum-pools with 1/k^2 in the next weights (or AvgPool2d nodes),
    max-pools a sum-pool (or one-hot conv) plus an OR neuron."""

    def __init__(self, g: _Graph, in_shape, maxpool: str, avgpool: str, neuron_masks: str = "threshold"):
        self.g, self.maxpool, self.avgpool = g, maxpool, avgpool
        self.unroll = neuron_masks == "unroll"
        self.flat = False  # "unroll": every node from the first gated consumer on is flat [C H W]
        self.gate = None  # "unroll": keep map of `src` still to be zeroed into its consumer's columns
        self.src = "input"
        self.shape = tuple(in_shape)  # [C, H, W] or [F] of what `src` emits
        self.channels = np.arange(in_shape[0])  # which of our module's channels `src` carries
        self.scale = 1.0  # pending 1/k^2 of sum-pools, folded into the next weights
        self.fold_pool = None  # (k, last neuron keep) when an avg-pool is folded into an FC
        self.last_keep = None  # keep map [C', H, W] of the last spiking node (its kept channels)
        self.last_node = None

    def conv(self, path: str, block: ConvBNSpike) -> None:
        w, b = fold_conv_bn(block)
        w = w[:, self.channels] * self.scale
        self.scale = 1.0
        keep = block.nmask.keep().numpy() if block.nmask.shape is not None else None
        conv = block.conv
        out_hw = _pool_out(self.shape[1:], conv.kernel_size, conv.stride, conv.padding)
        if keep is None:
            keep = np.ones((w.shape[0], *out_hw), dtype=bool)
        alive = np.flatnonzero(keep.reshape(keep.shape[0], -1).any(1))
        if alive.size == 0:
            alive = np.array([0])  # a layer with no neuron left: one silent channel keeps shapes
        w, b, keep = w[alive], b[alive], keep[alive]
        name = _name(path)
        shape = (len(alive), *out_hw)
        if self._go_flat(path):
            m = _unrolled(w, self.shape, conv.stride, conv.padding, conv.dilation, self._take_gate())
            self.g.add(f"{name}_conv", nir.Affine(weight=m, bias=_f32(np.repeat(b, int(np.prod(out_hw))))),
                       self.src)
        else:
            self.g.add(f"{name}_conv", nir.Conv2d(input_shape=tuple(self.shape[1:]), weight=_f32(w),
                                                 stride=tuple(conv.stride), padding=tuple(conv.padding),
                                                 dilation=tuple(conv.dilation), groups=1, bias=_f32(b)),
                       self.src)
        node_shape = (int(np.prod(shape)),) if self.flat else shape
        thr = _thresholds(block, shape, keep if not self.unroll else np.ones_like(keep)).reshape(node_shape)
        self.g.add(f"{name}_spk", neuron_node(block.neuron, thr), f"{name}_conv")
        self.g.map.spiking[f"{name}_spk"] = SpikeNode(path, alive, keep)
        self.src, self.shape, self.channels = f"{name}_spk", shape, alive
        self.last_keep, self.last_node = keep, f"{name}_spk"
        self.gate = keep if self.unroll and not keep.all() else None

    def _go_flat(self, path: str) -> bool:
        """With `unroll`, every node from the first consumer of a gated node on is flat (NIR
        has no unflatten). Returns whether this consumer is flat."""
        if self.gate is not None:
            self._flatten(path)
        return self.flat

    def _flatten(self, path: str) -> None:
        """Flatten `src` (dims -3..-1: batch-agnostic, read alike by every importer), once."""
        if not self.flat:
            self.g.add(f"{_name(path)}_flat", nir.Flatten(input_type={"input": np.array(self.shape)},
                                                          start_dim=-3, end_dim=-1), self.src)
            self.src, self.flat = f"{_name(path)}_flat", True

    def _take_gate(self) -> np.ndarray | None:
        """The keep map of `src` for its flat consumer to zero its masked neurons' columns."""
        gate, self.gate = self.gate, None
        return gate

    def pool(self, path: str, pool: SeqPool, next_is_fc: bool) -> None:
        p = pool.pool
        k, s, pad = p.kernel_size, p.stride, p.padding
        out_hw = _pool_out(self.shape[1:], k, s, pad)
        name = _name(path)
        partial = self.last_keep is not None and not self.last_keep.all()
        avg_into_fc = isinstance(p, nn.AvgPool2d) and next_is_fc and partial and self.avgpool == "sum"
        if not avg_into_fc and self._go_flat(path):
            self._flat_pool(name, path, p, out_hw)
            return
        if isinstance(p, nn.MaxPool2d):
            if self.maxpool == "sum":
                node = nir.SumPool2d(kernel_size=_pair(k), stride=_pair(s), padding=_pair(pad))
            else:
                node = _one_hot_conv(self.shape[0], k, s, pad, self.shape[1:])
            self.g.add(f"{name}_sum", node, self.src)
            shape = (self.shape[0], *out_hw)
            self.g.add(f"{name}_or", or_node(shape), f"{name}_sum")
            self.g.map.spiking[f"{name}_or"] = SpikeNode(path, self.channels, np.ones(shape, dtype=bool))
            self.src, self.shape = f"{name}_or", shape
            return
        if np.any(_pair(pad)) or not np.array_equal(_pair(k), _pair(s)):
            raise NIRExportError(f"{path}: only non-overlapping average pools without padding")
        if avg_into_fc:
            # The FC after it reads every pre-pool neuron: the pool and the neuron mask both
            # go into its weights (masked neurons get zero outgoing weights, no inf threshold).
            self.fold_pool = (_pair(k), self.shape)
            self.g.nodes[self.last_node] = neuron_node_uniform(self.g.nodes[self.last_node])
            self.shape, self.gate = (self.shape[0], *out_hw), None
            return
        if self.avgpool == "sum":
            self.g.add(f"{name}_sum", nir.SumPool2d(kernel_size=_pair(k), stride=_pair(s),
                                                    padding=_pair(pad)), self.src)
            self.scale *= 1.0 / float(np.prod(_pair(k)))
        else:
            self.g.add(f"{name}_avg", nir.AvgPool2d(kernel_size=_pair(k), stride=_pair(s),
                                                    padding=_pair(pad)), self.src)
        self.src, self.shape = (f"{name}_sum" if self.avgpool == "sum" else f"{name}_avg"), (self.shape[0], *out_hw)

    def _flat_pool(self, name: str, path: str, p: nn.Module, out_hw) -> None:
        """A pool on a flat node: the window sum as a Linear (masked inputs' columns zero),
        then the OR neuron (max-pool) or 1/k^2 into the next weights (average pool)."""
        k, s, pad = p.kernel_size, p.stride, p.padding
        m = _unrolled(_one_hot_weight(self.shape[0], k), self.shape, _pair(s), _pair(pad), (1, 1),
                      self._take_gate())
        self.g.add(f"{name}_sum", nir.Linear(weight=m), self.src)
        shape = (self.shape[0], *out_hw)
        self.src, self.shape = f"{name}_sum", shape
        if isinstance(p, nn.MaxPool2d):
            self.g.add(f"{name}_or", or_node((int(np.prod(shape)),)), f"{name}_sum")
            self.g.map.spiking[f"{name}_or"] = SpikeNode(path, self.channels, np.ones(shape, dtype=bool))
            self.src = f"{name}_or"
        else:
            self.scale *= 1.0 / float(np.prod(_pair(k)))

    def flatten_fc(self, path: str, block: LinearSpike) -> None:
        """Flatten (unless `src` is flat already) then the FC."""
        w = (block.fc.weight.detach().double() * block.fc.keep().double()).numpy()
        c_all = block.fc.in_features // int(np.prod(self.shape[1:]))
        w = w.reshape(w.shape[0], c_all, *self.shape[1:])[:, self.channels] * self.scale
        self.scale = 1.0
        if self.fold_pool is not None:
            (kh, kw), pre_shape = self.fold_pool
            w = np.repeat(np.repeat(w, kh, axis=2), kw, axis=3) / float(kh * kw)
            w = w * self.last_keep[None]
            self.shape, self.fold_pool = pre_shape, None
        flat = int(np.prod(self.shape))
        gate = self._take_gate()
        w = w.reshape(w.shape[0], flat) * (1.0 if gate is None else gate.reshape(1, -1))
        self._flatten(path)
        self.shape, self.channels = (flat,), None
        self._linear(path, block, w)

    def fc(self, path: str, block: LinearSpike) -> None:
        w = (block.fc.weight.detach().double() * block.fc.keep().double()).numpy()
        self._linear(path, block, w)

    def _linear(self, path: str, block: LinearSpike, w: np.ndarray) -> None:
        name = _name(path)
        if block.fc.bias is not None:
            node = nir.Affine(weight=_f32(w), bias=_f32(block.fc.bias.detach().numpy()))
        else:
            node = nir.Linear(weight=_f32(w))
        self.g.add(f"{name}_fc", node, self.src)
        self.src, self.shape = f"{name}_fc", (w.shape[0],)
        if block.neuron is not None:
            shape = (w.shape[0],)
            thr = np.full(shape, float(block.neuron.v_threshold))
            self.g.add(f"{name}_spk", neuron_node(block.neuron, thr), f"{name}_fc")
            self.g.map.spiking[f"{name}_spk"] = SpikeNode(path, None, np.ones(shape, dtype=bool))
            self.src = f"{name}_spk"
            self.last_keep, self.last_node = None, f"{name}_spk"

    def vote(self, num_classes: int) -> None:
        """Vote as a linear layer of ones: per class the spike (or value) sum of its group of
        G outputs, i.e. our mean times G (same ranking; integers for spikes)."""
        groups = self.shape[0] // num_classes
        w = np.kron(np.eye(num_classes), np.ones((1, groups)))
        self.g.add("vote", nir.Linear(weight=_f32(w)), self.src)
        self.src, self.shape = "vote", (num_classes,)


def neuron_node_uniform(node: nir.NIRNode) -> nir.NIRNode:
    """The same neuron with its +inf (masked) thresholds set back to the layer's threshold."""
    thr = node.v_threshold
    finite = thr[np.isfinite(thr)]
    value = float(finite.flat[0]) if finite.size else 1.0
    params = {k: getattr(node, k) for k in ("tau", "r", "v_leak", "v_reset") if hasattr(node, k)}
    return type(node)(v_threshold=np.full(thr.shape, value), **params)


def _cifar(net: Cifar6Conv2FC, maxpool, avgpool, neuron_masks) -> tuple[_Graph, tuple]:
    g = _Graph(net.input_shape)
    b = _Sequential(g, net.input_shape, maxpool, avgpool, neuron_masks)
    b.conv("stem", net.stem)
    for i, blk in enumerate(net.stage1):
        b.conv(f"stage1.{i}", blk)
    b.pool("pool1", net.pool1, False)
    for i, blk in enumerate(net.stage2):
        b.conv(f"stage2.{i}", blk)
    b.pool("pool2", net.pool2, True)
    b.flatten_fc("fc1", net.fc1)
    b.fc("fc2", net.fc2)
    b.vote(net.num_classes)
    return g, (b.src, b.shape)


def _vgg(net: VGGSNN, maxpool, avgpool, neuron_masks) -> tuple[_Graph, tuple]:
    T, c, h, w = net.input_shape
    g = _Graph((c, h, w))
    b = _Sequential(g, (c, h, w), maxpool, avgpool, neuron_masks)
    mods = list(net.features)
    for i, m in enumerate(mods):
        if isinstance(m, ConvBNSpike):
            b.conv(f"features.{i}", m)
        else:
            b.pool(f"features.{i}", m, next_is_fc=i == len(mods) - 1)
    b.flatten_fc("fc", net.fc)
    b.vote(net.num_classes)
    return g, (b.src, b.shape)


def _sew(net: SEWResNet, maxpool, avgpool, neuron_masks) -> tuple[_Graph, tuple]:
    """SEW-ResNet: every ADD is several edges into each consumer (NIR sums a node's inputs).

    Channels cannot be removed where spikes meet in an ADD, so a dead channel is silenced by
    zero weights and bias into it (its potential stays 0 < threshold); partial masks use +inf.
    """
    if neuron_masks != "threshold":
        raise NIRExportError("SEW-ResNet: only the 'threshold' neuron-mask encoding (no importer "
                             "here runs a SEW graph with partial masks; docs/NIR.md)")
    g = _Graph(net.input_shape)

    def conv(path, block, sources, in_hw):
        w, b = fold_conv_bn(block)
        c = block.conv
        out_hw = _pool_out(in_hw, c.kernel_size, c.stride, c.padding)
        keep = (block.nmask.keep().numpy() if block.nmask.shape is not None
                else np.ones((w.shape[0], *out_hw), dtype=bool))
        dead = ~keep.reshape(keep.shape[0], -1).any(1)
        w[dead], b[dead] = 0.0, 0.0
        thr = np.where(keep | dead[:, None, None], float(block.neuron.v_threshold), np.inf)
        name = _name(path)
        g.add(f"{name}_conv", nir.Conv2d(input_shape=tuple(in_hw), weight=_f32(w), stride=tuple(c.stride),
                                        padding=tuple(c.padding), dilation=tuple(c.dilation), groups=1,
                                        bias=_f32(b)), sources)
        g.add(f"{name}_spk", neuron_node(block.neuron, thr), f"{name}_conv")
        g.map.spiking[f"{name}_spk"] = SpikeNode(path, None, keep)
        return f"{name}_spk", out_hw

    src, hw = conv("stem", net.stem, "input", net.input_shape[1:])
    p = net.pool.pool
    out_hw = _pool_out(hw, p.kernel_size, p.stride, p.padding)
    ch = net.stem.conv.out_channels
    if maxpool == "sum":
        g.add("pool_sum", nir.SumPool2d(kernel_size=_pair(p.kernel_size), stride=_pair(p.stride),
                                        padding=_pair(p.padding)), src)
    else:
        g.add("pool_sum", _one_hot_conv(ch, p.kernel_size, p.stride, p.padding, hw), src)
    g.add("pool_or", or_node((ch, *out_hw)), "pool_sum")
    g.map.spiking["pool_or"] = SpikeNode("pool", None, np.ones((ch, *out_hw), dtype=bool))
    sources, hw = ["pool_or"], out_hw
    for i, block in enumerate(net.blocks):
        s, in_hw = sources, hw
        for j, blk in enumerate(block.convs):
            s, hw = conv(f"blocks.{i}.convs.{j}", blk, s, hw)
        if block.downsample is not None:
            d, _ = conv(f"blocks.{i}.downsample", block.downsample, sources, in_hw)
            sources = [s, d]
        else:
            sources = [s] + sources
    c = net.head.fc.in_features
    w = net.head.fc.weight.detach().double().numpy()
    area = int(np.prod(hw))
    if area > 1:
        # The spatial mean: a sum-pool over the whole map, 1/(H W) folded into the head.
        g.add("gap_sum", nir.SumPool2d(kernel_size=_pair(tuple(hw)), stride=_pair(tuple(hw)),
                                       padding=_pair(0)), sources)
        sources = "gap_sum"
    g.add("head_flat", nir.Flatten(input_type={"input": np.array((c, 1, 1))}, start_dim=-3, end_dim=-1),
          sources)
    g.add("head_fc", nir.Affine(weight=_f32(w / area), bias=_f32(net.head.fc.bias.detach().numpy())),
          "head_flat")
    return g, ("head_fc", (net.num_classes,))


def gt_threshold(threshold: np.ndarray) -> np.ndarray:
    """The threshold under which NIR's `v > theta'` equals our `v >= theta` on float32
    potentials: theta' = the float32 just below theta (+inf stays +inf)."""
    below = np.nextafter(np.asarray(threshold, dtype=np.float32), np.float32(-np.inf))
    return np.where(np.isfinite(threshold), below.astype(np.float64), threshold)


def build_graph(net: nn.Module, *, model_name: str, metadata: dict | None = None,
                maxpool: str = "sum", avgpool: str = "sum", firing: str = "gt",
                neuron_masks: str = "threshold") -> tuple[nir.NIRGraph, NodeMap]:
    """The NIR graph of `net` (hard masks set, eval mode) and which of our modules each
    spiking node reproduces. maxpool: "sum" (SumPool2d) or "conv" (one-hot Conv2d, for
    importers that drop SumPool2d padding); avgpool: "sum" (SumPool2d, 1/k^2 into the next
    weights) or "avg" (AvgPool2d node); firing: "gt" writes thresholds for the NIR rule
    v > theta (see gt_threshold), "ge" our own theta, for simulators that fire at v >= theta
    (SpikingJelly); neuron_masks: see NEURON_MASK_ENCODINGS."""
    if neuron_masks not in NEURON_MASK_ENCODINGS:
        raise NIRExportError(f"neuron-mask encoding must be one of {NEURON_MASK_ENCODINGS}, got {neuron_masks!r}")
    if maxpool not in MAXPOOL_ENCODINGS:
        raise NIRExportError(f"max-pool encoding must be one of {MAXPOOL_ENCODINGS}, got {maxpool!r}")
    if avgpool not in AVGPOOL_ENCODINGS:
        raise NIRExportError(f"avg-pool encoding must be one of {AVGPOOL_ENCODINGS}, got {avgpool!r}")
    if firing not in FIRING_RULES:
        raise NIRExportError(f"firing rule must be one of {FIRING_RULES}, got {firing!r}")
    if net.training:
        raise NIRExportError("the network must be in eval mode (BatchNorm running statistics)")
    builders = [(Cifar6Conv2FC, _cifar), (VGGSNN, _vgg), (SEWResNet, _sew)]
    build = next((f for cls, f in builders if isinstance(net, cls)), None)
    if build is None:
        raise NIRExportError(f"no NIR export for {type(net).__name__}")
    with torch.no_grad():
        g, (src, shape) = build(net, maxpool, avgpool, neuron_masks)
    if firing == "gt":
        for name, node in g.nodes.items():
            if isinstance(node, (nir.LIF, nir.IF)) and not name.endswith("_or"):
                node.v_threshold = gt_threshold(node.v_threshold)
    meta = {"model_name": model_name, "T": int(net.T), "dt": DT,
            "dt_convention": "one forward-Euler step of the NIR equations = one time step, "
                             f"dt = {DT} s; LIF tau = 2 dt, r = 1; IF r = 1 / dt",
            "maxpool": maxpool, "avgpool": avgpool, "firing": firing, "neuron_masks": neuron_masks,
            "neuron_masks_encoding": "dead channels removed (SEW: zero weights and bias into them); other "
                                     "masked neurons: zero outgoing weights where an FC reads them, else "
                                     + ("v_threshold = +inf" if neuron_masks == "threshold" else
                                        "zero outgoing weights too: from the first conv or pool that reads "
                                        "one on, every node is flat (C H W order), convs and pools unrolled "
                                        "into Affine / Linear nodes; every threshold uniform"),
            "vote": "Linear of ones: spike count per class over its group (our mean x group size)",
            "threshold_rule": ("NIR's v > v_threshold; v_threshold is the float32 just below our "
                               "threshold, so that it equals our v >= threshold on float32 potentials"
                               if firing == "gt" else
                               "v >= v_threshold (our rule and SpikingJelly's, not NIR's v > v_threshold)"),
            **(metadata or {})}
    graph = g.finish(src, shape, meta)
    return graph, g.map


def static_input(net: nn.Module) -> bool:
    """Image nets repeat the image at every step (direct encoding); DVS nets get frame t at step t."""
    return not isinstance(net, VGGSNN)
