"""Compile a hardened spikeprune network into the event engine's tables (docs/DEPLOY.md).

What the compiled program holds, per synaptic layer:
- BatchNorm folded into the conv in float64 (w' = w * gamma / sqrt(var + eps), bias
  beta - mean * gamma / sqrt(var + eps)), hard weight masks applied, only kept synapses stored;
- kernel entries grouped by input channel (a spike scatters through them) or, for the dense
  first layer, by output channel (a neuron gathers its pixels through them);
- the live neurons: kept by the neuron mask and able to fire, i.e. with a kept synapse from a
  neuron upstream that can fire, or a bias that makes them fire on its own. Others are never
  updated; input channels that can never fire and output channels with no live neuron lose
  their kernel entries.

Only the three network families of model/ are known (their forward passes are short and
fixed); a fourth family needs its own `_compile_*` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from deploy.engine_kernels import (ADD, AVGPOOL, GATHER, KIND_IF, KIND_LIF, LAY_COLS, L_BIAS, L_CIN,
                                   L_COUNT, L_COUT, L_HIN, L_HOUT, L_KIND, L_LIVE, L_MASK, L_NLIVE,
                                   L_OUTSPIKE, L_PAD, L_PTR, L_REC, L_SOFF, L_STATIC, L_STRIDE, L_V,
                                   L_WIN, L_WOUT, MAXPOOL, NEURON, OUTPUT, SCATTER)
from deploy.fold import fold_conv_bn
from deploy.rundir import DeployError
from model.cifar_net import Cifar6Conv2FC
from model.layers import ConvBNSpike, LinearSpike
from model.masks import masked_modules
from model.neurons import MultiStepIF, MultiStepLIF
from model.sew_resnet import SEWResNet
from model.vgg_dvs import VGGSNN


@dataclass
class Program:
    """Everything `deploy.engine.EventEngine` hands to the kernel, plus names to read it back."""

    T: int
    num_classes: int
    out_size: int
    vote: bool  # the output is a vote of groups (6Conv2FC, VGGSNN), else one unit per class
    input_shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    counted: list[str]  # weight layer names, in the energy report's spelling, one per SOP slot
    recorded: dict[str, tuple[int, tuple[int, int, int]]]  # block name -> (offset, (C, H, W))
    rec_size: int
    stats: dict[str, dict] = field(default_factory=dict)  # per layer: kept synapses, live neurons


class _Builder:
    def __init__(self, T: int):
        self.T = T
        self.layers: list[dict] = []
        self.maps: list[tuple[int, int, int]] = []
        self.ops: list[list[int]] = []
        self.counted: list[str] = []
        self.recorded: dict[str, tuple[int, tuple[int, int, int]]] = {}
        self.rec_size = 0
        self.stats: dict[str, dict] = {}

    def new_map(self, chw: tuple[int, int, int]) -> int:
        self.maps.append(tuple(int(v) for v in chw))
        return len(self.maps) - 1

    def op(self, kind: int, a: int = -1, out: int = -1, layer: int = -1, *params: int) -> None:
        row = [kind, a, out, layer, *params]
        self.ops.append(row + [0] * (8 - len(row)))

    def layer(self, name: str, w: np.ndarray, b: np.ndarray, in_chw, out_chw, stride: int, pad: int,
              live: np.ndarray, *, gather: bool, static: bool = False, neuron: str | None = "lif",
              tau: float = 2.0, counted: bool = False, record: bool = True, outspike: bool = False,
              in_alive: np.ndarray | None = None) -> int:
        """Register one synaptic layer: w = (weights [Co, Ci, kh, kw] float64, keep bool); only
        kept synapses from input channels that can fire to output channels with a live neuron
        are stored (a kept synapse of weight 0 still counts: the energy report counts it)."""
        w, keep = w
        co_live = live.reshape(live.shape[0], -1).any(1)
        ci_alive = (np.ones(w.shape[1], bool) if in_alive is None
                    else in_alive.reshape(w.shape[1], -1).any(1))
        keep = keep & co_live[:, None, None, None] & ci_alive[None, :, None, None]
        co, ci, ky, kx = np.nonzero(keep)
        if gather:  # grouped by output channel
            order = np.lexsort((kx, ky, ci, co))
            group, other, n_groups = co[order], ci[order], w.shape[0]
        else:  # grouped by input channel
            order = np.lexsort((kx, ky, co, ci))
            group, other, n_groups = ci[order], co[order], w.shape[1]
        ptr = np.zeros(n_groups + 1, np.int64)
        np.add.at(ptr, group + 1, 1)
        ptr = np.cumsum(ptr)
        ent = np.stack([other, ky[order], kx[order]], 1).astype(np.int32)
        wts = w[co[order], ci[order], ky[order], kx[order]].astype(np.float64)
        live_idx = np.flatnonzero(live.reshape(-1)).astype(np.int64)
        live_chw = np.stack(np.unravel_index(live_idx, out_chw), 1).astype(np.int32).reshape(-1, 3)
        self.layers.append(dict(name=name, ptr=ptr, ent=ent, wts=wts, bias=b.astype(np.float64),
                                live=live_idx, livec=live_chw, mask=live.reshape(-1).astype(np.uint8),
                                in_chw=in_chw, out_chw=out_chw, stride=stride, pad=pad,
                                gather=gather, static=static, neuron=neuron, tau=tau, outspike=outspike,
                                slot=len(self.counted) if counted else -1,
                                rec=self.rec_size if (record and neuron) else 0))
        if counted:
            self.counted.append(name)
        if record and neuron:
            self.recorded[name.rsplit(".", 1)[0]] = (self.rec_size, tuple(out_chw))
            self.rec_size += int(np.prod(out_chw))
        self.stats[name] = dict(kept_synapses=int(keep.sum()), live_neurons=int(live_idx.size),
                                neurons=int(live.size))
        return len(self.layers) - 1

    def program(self, num_classes: int, out_size: int, vote: bool, input_shape) -> Program:
        n_l = len(self.layers)
        lay = np.zeros((n_l, LAY_COLS), np.int64)
        cat = {k: [] for k in ("ptr", "ent", "wts", "bias", "live", "livec", "mask")}
        offs = dict.fromkeys(cat, 0)
        v_off = s_off = 0
        for g, L in enumerate(self.layers):
            ci, hi, wi = L["in_chw"]
            co, ho, wo = L["out_chw"]
            lay[g, [L_CIN, L_HIN, L_WIN, L_COUT, L_HOUT, L_WOUT]] = [ci, hi, wi, co, ho, wo]
            lay[g, L_STRIDE], lay[g, L_PAD] = L["stride"], L["pad"]
            ent = L["ent"].copy()
            lay[g, L_PTR] = offs["ptr"]
            ptr = L["ptr"] + offs["ent"]  # entries and weights share one index
            for key, arr in (("ptr", ptr), ("ent", ent), ("wts", L["wts"]), ("bias", L["bias"]),
                             ("live", L["live"]), ("livec", L["livec"]), ("mask", L["mask"])):
                cat[key].append(arr)
            lay[g, L_LIVE], lay[g, L_NLIVE] = offs["live"], L["live"].size
            lay[g, L_MASK], lay[g, L_BIAS] = offs["mask"], offs["bias"]
            lay[g, L_V], lay[g, L_SOFF] = v_off, s_off
            lay[g, L_STATIC] = int(L["static"])
            lay[g, L_KIND] = KIND_IF if L["neuron"] == "if" else KIND_LIF
            lay[g, L_COUNT], lay[g, L_REC], lay[g, L_OUTSPIKE] = L["slot"], L["rec"], int(L["outspike"])
            v_off += L["live"].size
            if L["gather"]:
                s_off += L["live"].size
            offs["ptr"] += ptr.size
            offs["ent"] += ent.shape[0]
            for key in ("bias", "live", "mask"):
                offs[key] += L[key].size
        maps = np.zeros((len(self.maps), 5), np.int64)
        off = 0
        for m, (c, h, w) in enumerate(self.maps):
            maps[m] = [off, c * h * w, c, h, w]
            off += c * h * w
        largest = max([c * h * w for c, h, w in self.maps] + [int(np.prod(L["out_chw"])) for L in self.layers])
        arrays = dict(
            ops=np.asarray(self.ops, np.int64), lay=lay, maps=maps,
            ptr=np.concatenate(cat["ptr"]).astype(np.int64),
            ent=np.concatenate(cat["ent"]).astype(np.int32).reshape(-1, 3),
            wts=np.concatenate(cat["wts"]).astype(np.float64),
            bias=np.concatenate(cat["bias"]).astype(np.float64),
            live=np.concatenate(cat["live"]).astype(np.int64),
            livec=np.concatenate(cat["livec"]).astype(np.int32).reshape(-1, 3),
            livemask=np.concatenate(cat["mask"]).astype(np.uint8),
            taus=np.asarray([L["tau"] for L in self.layers], np.float64),
            sizes=np.asarray([max(off, 1), largest, v_off, s_off], np.int64))
        return Program(T=self.T, num_classes=num_classes, out_size=out_size, vote=vote,
                       input_shape=tuple(input_shape), arrays=arrays, counted=list(self.counted),
                       recorded=dict(self.recorded), rec_size=self.rec_size, stats=self.stats)


def _neuron_of(block) -> tuple[str | None, float]:
    n = getattr(block, "neuron", None)
    if n is None:
        return None, 0.0
    if isinstance(n, MultiStepLIF):
        if not n.decay_input or n.v_reset != 0.0 or n.v_threshold != 1.0:
            raise DeployError(f"LIF with {n.extra_repr()}: the engine supports decay_input, threshold 1, reset 0")
        return "lif", n.tau
    if isinstance(n, MultiStepIF):
        if n.v_reset != 0.0 or n.v_threshold != 1.0:
            raise DeployError(f"IF with {n.extra_repr()}: the engine supports threshold 1, reset 0")
        return "if", 0.0
    raise DeployError(f"neuron {type(n).__name__}: the engine knows LIF and IF")


def _folded(block) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """((w', keep) [Co, Ci, kh, kw], bias [Co]) in float64: hard mask applied, BN folded."""
    if isinstance(block, LinearSpike):
        lin = block.fc
        keep = lin.keep().cpu().numpy()[:, :, None, None]
        w = lin.weight.detach().cpu().double().numpy()[:, :, None, None] * keep
        b = (lin.bias.detach().cpu().double().numpy() if lin.bias is not None
             else np.zeros(lin.out_features))
        return (w, keep), b
    w, b = fold_conv_bn(block)
    return (w, block.conv.keep().cpu().numpy()), b


def _fires_alone(b: np.ndarray, neuron: str | None, tau: float, T: int) -> np.ndarray:
    """Per channel: does a neuron with no input but its bias fire within T steps?"""
    if neuron is None:
        return np.ones_like(b, bool)
    v = np.zeros_like(b)
    fired = np.zeros_like(b, bool)
    for _ in range(T):
        h = v + (b - v) / tau if neuron == "lif" else v + b
        s = h >= 1.0
        fired |= s
        v = np.where(s, 0.0, h)
    return fired


def _geometry(block) -> tuple[int, int]:
    if isinstance(block, LinearSpike):
        return 1, 0
    return int(block.conv.stride[0]), int(block.conv.padding[0])


def _post_keep(block, out_chw) -> np.ndarray:
    nmask = getattr(block, "nmask", None)
    if nmask is not None and nmask.logits is not None and nmask.mode != "off":
        return nmask.keep().cpu().numpy().reshape(out_chw)
    return np.ones(out_chw, bool)


def _synaptic(bld: _Builder, name: str, block, src: int | None, in_chw, alive_in: np.ndarray | None,
              *, T: int, gather: bool = False, static: bool = False, record: bool = True,
              outspike: bool = False) -> tuple[int | None, np.ndarray, tuple[int, int, int]]:
    """Add one synaptic layer (+ its neuron) reading map `src` (or the input when gather);
    return (output map or None for a real-valued layer, its alive map, its shape)."""
    (w, keep), b = _folded(block)
    neuron, tau = _neuron_of(block)
    stride, pad = _geometry(block)
    kh = w.shape[2]
    if isinstance(block, LinearSpike):
        in_chw = (int(np.prod(in_chw)), 1, 1)
        if w.shape[1] != in_chw[0]:
            raise DeployError(f"{name}: {w.shape[1]} inputs, the layer before gives {in_chw[0]}")
        out_chw = (w.shape[0], 1, 1)
    else:
        ho = (in_chw[1] + 2 * pad - kh) // stride + 1
        wo = (in_chw[2] + 2 * pad - w.shape[3]) // stride + 1
        out_chw = (w.shape[0], ho, wo)
    a_in = np.ones(in_chw, bool) if alive_in is None else alive_in.reshape(in_chw)
    reach = F.conv2d(torch.from_numpy(a_in.astype(np.float64))[None],
                     torch.from_numpy(keep.astype(np.float64)), stride=stride, padding=pad)[0].numpy() > 0
    keep_post = _post_keep(block, out_chw)
    if neuron is None:
        live = np.ones(out_chw, bool)
    else:
        live = keep_post & (reach | _fires_alone(b, neuron, tau, T)[:, None, None])
    counted = bool((block.fc if isinstance(block, LinearSpike) else block.conv).counted)
    g = bld.layer(f"{name}.{'fc' if isinstance(block, LinearSpike) else 'conv'}", (w, keep), b, in_chw,
                  out_chw, stride, pad, live, gather=gather, static=static, neuron=neuron, tau=tau,
                  counted=counted, record=record, outspike=outspike,
                  in_alive=None if gather else a_in)
    if gather:
        bld.op(GATHER, -1, -1, g)
    else:
        bld.op(SCATTER, src, -1, g)
    if neuron is None:
        bld.op(OUTPUT, -1, -1, g)
        return None, live, out_chw
    out = bld.new_map(out_chw)
    bld.op(NEURON, -1, out, g)
    return out, live, out_chw


def _pool(bld: _Builder, kind: str, src: int, chw, alive: np.ndarray, k: int, s: int, p: int):
    c, h, w = chw
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = bld.new_map((c, ho, wo))
    bld.op(MAXPOOL if kind == "max" else AVGPOOL, src, out, -1, k, s, p)
    a = torch.from_numpy(alive.astype(np.float64))[None]
    pooled = (F.max_pool2d(a, k, s, p) if kind == "max" else F.avg_pool2d(a, k, s, p))[0].numpy() > 0
    return out, pooled, (c, ho, wo)


def _check_hard(net) -> None:
    soft = [n for n, m in masked_modules(net) if m.logits is not None and m.mode == "soft"]
    if soft:
        raise DeployError(f"mask {soft[0]} is soft (the run is still searching): "
                          "the engine runs a hardened network (hard or off masks)")
    if net.training:
        raise DeployError("the network is in training mode: BatchNorm must use its running "
                          "statistics (net.eval())")


def compile_network(net) -> Program:
    """The engine's program for a hardened net in eval mode (hard masks, or none for a dense run)."""
    _check_hard(net)
    with torch.no_grad():
        if isinstance(net, Cifar6Conv2FC):
            return _compile_cifar(net)
        if isinstance(net, VGGSNN):
            return _compile_vgg(net)
        if isinstance(net, SEWResNet):
            return _compile_sew(net)
    raise DeployError(f"{type(net).__name__}: the engine compiles 6Conv2FC, VGGSNN and SEW-ResNet")


def _compile_cifar(net: Cifar6Conv2FC) -> Program:
    T = net.T
    bld = _Builder(T)
    m, alive, chw = _synaptic(bld, "stem", net.stem, None, net.input_shape, None, T=T, gather=True, static=True)
    for i, blk in enumerate(net.stage1):
        m, alive, chw = _synaptic(bld, f"stage1.{i}", blk, m, chw, alive, T=T)
    m, alive, chw = _pool(bld, "max", m, chw, alive, 2, 2, 0)
    for i, blk in enumerate(net.stage2):
        m, alive, chw = _synaptic(bld, f"stage2.{i}", blk, m, chw, alive, T=T)
    m, alive, chw = _pool(bld, "max", m, chw, alive, 2, 2, 0)
    m, alive, chw = _synaptic(bld, "fc1", net.fc1, m, chw, alive, T=T)
    m, alive, chw = _synaptic(bld, "fc2", net.fc2, m, chw, alive, T=T, outspike=True)
    return bld.program(net.num_classes, chw[0], True, net.input_shape)


def _compile_vgg(net: VGGSNN) -> Program:
    T = net.T
    bld = _Builder(T)
    m = alive = None
    chw = net.input_shape[1:]
    for i, mod in enumerate(net.features):
        if isinstance(mod, ConvBNSpike):
            first = m is None
            m, alive, chw = _synaptic(bld, f"features.{i}", mod, m, chw, alive, T=T, gather=first)
        else:
            m, alive, chw = _pool(bld, "avg", m, chw, alive, *_pool_args(mod))
    _, _, chw = _synaptic(bld, "fc", net.fc, m, chw, alive, T=T)
    return bld.program(net.num_classes, chw[0], True, net.input_shape)


def _pool_args(seqpool) -> tuple[int, int, int]:
    p = seqpool.pool

    def one(v):
        return int(v[0] if isinstance(v, (tuple, list)) else v)
    if isinstance(p, torch.nn.AvgPool2d) and (p.ceil_mode or not p.count_include_pad and one(p.padding)):
        raise DeployError("average pooling with ceil_mode / count_include_pad=False is not supported")
    return one(p.kernel_size), one(p.stride), one(p.padding)


def _compile_sew(net: SEWResNet) -> Program:
    T = net.T
    bld = _Builder(T)
    m, alive, chw = _synaptic(bld, "stem", net.stem, None, net.input_shape, None, T=T, gather=True, static=True)
    m, alive, chw = _pool(bld, "max", m, chw, alive, *_pool_args(net.pool))
    for b, block in enumerate(net.blocks):
        x, x_alive, x_chw = m, alive, chw
        if block.downsample is not None:
            ident, id_alive, _ = _synaptic(bld, f"blocks.{b}.downsample", block.downsample, x, x_chw,
                                           x_alive, T=T)
        else:
            ident, id_alive = x, x_alive
        for i, conv in enumerate(block.convs):
            m, alive, chw = _synaptic(bld, f"blocks.{b}.convs.{i}", conv, m, chw, alive, T=T)
        out = bld.new_map(chw)
        bld.op(ADD, m, out, -1, ident)
        m, alive = out, alive | id_alive.reshape(alive.shape)
    c, h, w = chw
    if h != w:
        raise DeployError(f"SEW head over a {h}x{w} map: the engine's global mean needs a square map")
    m, alive, chw = _pool(bld, "avg", m, chw, alive, h, h, 0)
    _, _, chw = _synaptic(bld, "head", net.head, m, chw, alive, T=T)
    return bld.program(net.num_classes, chw[0], False, net.input_shape)
