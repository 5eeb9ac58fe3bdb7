"""Compile a hardened spikeprune network into the event engine's tables (docs/DEPLOY.md).

What the compiled program holds, per synaptic layer:
- BatchNorm folded into the conv in float64 (w' = w * gamma / sqrt(var + eps), bias
  beta - mean * gamma / sqrt(var + eps)), hard weight masks applied, only kept synapses stored;
- synapses unrolled over positions: one row per input position that can fire, holding the flat
  index and weight of every kept synapse that lands in bounds on a live neuron (a spike adds
  its row, no index arithmetic or bounds test per synapse). Memory is the kept connections,
  the connectivity times the dense count. The dense first layer keeps its weights per output
  channel; the kernel computes each weighted channel's map from a zero-padded copy of the
  input and reads it at the live neurons;
- the live neurons: kept by the neuron mask and able to fire, i.e. with a kept synapse from a
  neuron upstream that can fire, or a bias that makes them fire on its own. Others are never
  updated; input channels that can never fire and output channels with no live neuron lose
  their kernel entries.

Only the three network families of model/ are known (their forward passes are short and
fixed); a fourth family needs its own `_compile_*` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from deploy.engine_kernels import (ADD, AVGPOOL, GATHER, KIND_IF, KIND_LIF, LAY_COLS, L_BIAS, L_CIN,
                                   L_COUNT, L_COUT, L_DENSE, L_HIN, L_HOUT, L_KIND, L_LIVE, L_NLIVE,
                                   L_OUTSPIKE, L_PAD, L_PTR, L_REC, L_SIZE, L_SOFF, L_STATIC, L_STRIDE,
                                   L_V, L_WIN, L_WOUT, MAXPOOL, NEURON, OUTPUT, SCATTER)

# A layer's rows are stored dense (pruned weights as 0, vectorised) when at least this share
# of the stored values would be kept weights, and the dense rows stay under DENSE_MAX values.
DENSE_SHARE = 0.25
DENSE_MAX = 1 << 24
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

    @cached_property
    def tables(self) -> tuple:
        """The kernel's leading arguments (deploy/engine_kernels.py `run_chunk`), made once."""
        a = self.arrays
        return (self.T, *(a[k] for k in ("ops", "lay", "maps", "ptr", "idx", "wts", "wts32", "bias", "lbias",
                                         "lbase", "live", "inv_taus")))


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
        self.tables: list[dict] = []

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
        kept synapses from inputs that can fire to live neurons are stored, unrolled over
        positions (a kept synapse of weight 0 still counts: the energy report counts it)."""
        w, keep = w
        co_live = live.reshape(live.shape[0], -1).any(1)
        ci_alive = (np.ones(w.shape[1], bool) if in_alive is None
                    else in_alive.reshape(w.shape[1], -1).any(1))
        keep = keep & co_live[:, None, None, None] & ci_alive[None, :, None, None]
        live_idx = np.flatnonzero(live.reshape(-1)).astype(np.int64)
        if gather:
            ptr, idx, wts, base = _gather_rows(w, keep, live_idx, in_chw, out_chw, stride, pad)
            dense = 0
            n_off = out_chw[0] + 1  # the live-neuron starts after the weight pointers are no offsets
        else:
            ptr, idx, wts = _scatter_rows(w, keep, live.reshape(-1), in_alive.reshape(-1), in_chw, out_chw,
                                          stride, pad)
            compact = np.full(live.size, -1, np.int64)
            compact[live_idx] = np.arange(live_idx.size)
            ptr, idx, wts, dense = _dense_rows(ptr, compact[idx], wts, live_idx.size)
            base = np.zeros(live_idx.size, np.int64)
            n_off = int(np.prod(in_chw)) + 1
        self.layers.append(dict(name=name, ptr=ptr, n_off=n_off, idx=idx, wts=wts, bias=b.astype(np.float64),
                                lbias=b[live_idx // int(np.prod(out_chw[1:]))].astype(np.float64), lbase=base,
                                in_chw=in_chw,
                                pad=pad, stride=stride, dense=dense, live=live_idx, out_chw=out_chw, gather=gather,
                                static=static, neuron=neuron, tau=tau, outspike=outspike,
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

    def table(self, op: int, ptr: np.ndarray, idx: np.ndarray) -> None:
        """A pooling op's rows (input position -> pooled outputs); ops[op, 5] gets their offset."""
        self.tables.append(dict(op=op, ptr=ptr, n_off=ptr.size, idx=idx, wts=np.zeros(idx.size)))

    def program(self, num_classes: int, out_size: int, vote: bool, input_shape) -> Program:
        n_l = len(self.layers)
        lay = np.zeros((n_l, LAY_COLS), np.int64)
        ops = np.asarray(self.ops, np.int64)
        cat = {k: [] for k in ("ptr", "idx", "wts", "wts32", "bias", "lbias", "lbase", "live")}
        offs = dict.fromkeys(cat, 0)
        v_off = s_off = padded = largest = 0
        if sum(L["gather"] for L in self.layers) > 1:
            raise ValueError("one gathered (first) layer per network: the kernel's padded input is shared")
        for g, L in enumerate([*self.layers, *self.tables]):
            ptr = L["ptr"].copy()
            if L.get("dense") == 2:  # float32 rows: their own array
                ptr[:L["n_off"]] += offs["wts32"]
                cat["wts32"].append(L["wts"])
                offs["wts32"] += L["wts"].size
                L = {**L, "wts": np.zeros(0)}
            else:
                ptr[:L["n_off"]] += offs["idx"]  # targets and weights share one index
            if "op" in L:
                ops[L["op"], 5] = offs["ptr"]
            else:
                lay[g, L_PTR] = offs["ptr"]
            offs["ptr"] += ptr.size
            offs["idx"] += L["idx"].size
            for key, arr in (("ptr", ptr), ("idx", L["idx"]), ("wts", L["wts"])):
                cat[key].append(arr)
            if "op" in L:
                continue
            for key in ("bias", "lbias", "lbase", "live"):
                cat[key].append(L[key])
            (ci, hi, wi), (co, ho, wo) = L["in_chw"], L["out_chw"]
            lay[g, [L_CIN, L_HIN, L_WIN, L_COUT, L_HOUT, L_WOUT]] = [ci, hi, wi, co, ho, wo]
            lay[g, L_PAD], lay[g, L_STRIDE], lay[g, L_SIZE] = L["pad"], L["stride"], ci * hi * wi
            lay[g, L_DENSE] = L["dense"]
            if L["gather"]:  # the padded input, one row of slack; the unit-stride map's layout
                hp, wp = hi + 2 * L["pad"], wi + 2 * L["pad"]
                padded = max(padded, (ci * hp + 1) * wp)
                largest = max(largest, ho * wp)
            lay[g, L_LIVE], lay[g, L_NLIVE] = offs["live"], L["live"].size
            lay[g, L_BIAS] = offs["bias"]
            lay[g, L_V], lay[g, L_SOFF] = v_off, s_off
            lay[g, L_STATIC] = int(L["static"])
            lay[g, L_KIND] = KIND_IF if L["neuron"] == "if" else KIND_LIF
            lay[g, L_COUNT], lay[g, L_REC], lay[g, L_OUTSPIKE] = L["slot"], L["rec"], int(L["outspike"])
            v_off += L["live"].size
            if L["gather"]:
                s_off += L["live"].size
            for key in ("bias", "live"):
                offs[key] += L[key].size
        maps = np.zeros((len(self.maps), 5), np.int64)
        off = 0
        for m, (c, h, w) in enumerate(self.maps):
            maps[m] = [off, c * h * w, c, h, w]
            off += c * h * w
        largest = max(largest, *(c * h * w for c, h, w in self.maps),
                      *(int(np.prod(L["out_chw"])) for L in self.layers))
        arrays = dict(
            ops=ops, lay=lay, maps=maps,
            ptr=np.concatenate(cat["ptr"]).astype(np.uint64),
            idx=np.concatenate(cat["idx"]).astype(np.uint32),
            wts=np.concatenate(cat["wts"]).astype(np.float64),
            wts32=np.concatenate([np.zeros(0, np.float32), *cat["wts32"]]).astype(np.float32),
            bias=np.concatenate(cat["bias"]).astype(np.float64),
            lbias=np.concatenate(cat["lbias"]).astype(np.float64),
            lbase=np.concatenate(cat["lbase"]).astype(np.uint32),
            live=np.concatenate(cat["live"]).astype(np.uint32),
            inv_taus=np.asarray([1.0 / L["tau"] if L["neuron"] == "lif" else 0.0 for L in self.layers], np.float64),
            sizes=np.asarray([max(off, 1), largest, v_off, s_off, max(padded, 1)], np.int64))
        return Program(T=self.T, num_classes=num_classes, out_size=out_size, vote=vote,
                       input_shape=tuple(input_shape), arrays=arrays, counted=list(self.counted),
                       recorded=dict(self.recorded), rec_size=self.rec_size, stats=self.stats)


def _expand(ptr: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, entry) of every entry of each row's group, rows in order, entries in group order."""
    counts = ptr[groups + 1] - ptr[groups]
    rows = np.repeat(np.arange(groups.size), counts)
    first = np.repeat(ptr[groups] - np.cumsum(counts) + counts, counts)
    return rows, first + np.arange(rows.size)


def _grouped(keep: np.ndarray, by_output: bool) -> tuple[np.ndarray, ...]:
    """Kept synapses as (ptr over the grouping channel, other channel, ky, kx, (co, ci, ky, kx))."""
    co, ci, ky, kx = np.nonzero(keep)
    order = np.lexsort((kx, ky, ci, co)) if by_output else np.lexsort((kx, ky, co, ci))
    group = (co if by_output else ci)[order]
    ptr = np.zeros(keep.shape[0 if by_output else 1] + 1, np.int64)
    np.add.at(ptr, group + 1, 1)
    return np.cumsum(ptr), (ci if by_output else co)[order], ky[order], kx[order], (
        co[order], ci[order], ky[order], kx[order])


def _gather_rows(w, keep, live_idx, in_chw, out_chw, stride, pad):
    """Kept weights grouped by output channel, each with its offset in the zero-padded input
    [C, H + 2 pad, W + 2 pad]; after those pointers, where each channel's live neurons start;
    per live neuron its position in the channel map, whose rows are the padded input's width
    at unit stride (the kernel's layout, deploy/engine_kernels.py `_gather`)."""
    ptr, ci, ky, kx, widx = _grouped(keep, True)
    _, hin, win = in_chw
    hp, wp = hin + 2 * pad, win + 2 * pad
    co, oy, ox = np.unravel_index(live_idx, out_chw)
    starts = np.searchsorted(co, np.arange(out_chw[0] + 1))  # live neurons are channel-major
    return (np.concatenate([ptr, starts]), ((ci * hp + ky) * wp + kx).astype(np.int32), w[widx],
            oy * (wp if stride == 1 else out_chw[2]) + ox)


def _dense_rows(rptr, tgt, wts, n_live):
    """CSR rows (targets as live-neuron indices) as they are (kind 0), or as full rows of all
    n_live targets (pruned weights 0) followed by each position's kept count, when dense pays:
    float32 (kind 2, half the bytes to stream) when every weight is a float32 value, as in an FC
    layer without BatchNorm (float64 products of them are exact), else float64 (kind 1)."""
    counts = np.diff(rptr)
    full = np.flatnonzero(counts)
    if tgt.size < DENSE_SHARE * full.size * n_live or full.size * n_live > DENSE_MAX:
        return rptr, tgt.astype(np.int32), wts, 0
    rows = np.zeros((full.size, n_live))
    rows[np.repeat(np.arange(full.size), counts[full]), tgt] = wts
    starts = np.zeros(counts.size + 1, np.int64)
    starts[1:] = np.cumsum(np.where(counts > 0, n_live, 0))
    if np.array_equal(rows.astype(np.float32).astype(np.float64), rows):  # no BatchNorm folded in
        return np.concatenate([starts, counts]), np.zeros(0, np.int32), rows.reshape(-1).astype(np.float32), 2
    return np.concatenate([starts, counts]), np.zeros(rows.size, np.int32), rows.reshape(-1), 1


def _scatter_rows(w, keep, live_mask, in_alive, in_chw, out_chw, stride, pad):
    """One row per input position (flat [C, H, W] of the map read): (target, weight) of each kept
    synapse that lands in bounds on a live neuron, in (co, ky, kx) order; positions that can
    never fire have empty rows. An FC layer is the 1x1 case of the same arithmetic."""
    ptr, co, ky, kx, widx = _grouped(keep, False)
    _, hout, wout = out_chw
    pos = np.flatnonzero(in_alive)
    ci_p, y_p, x_p = np.unravel_index(pos, in_chw)
    rows, e = _expand(ptr, ci_p)
    ny = y_p[rows] + pad - ky[e]
    nx = x_p[rows] + pad - kx[e]
    oy, ox = ny // stride, nx // stride
    ok = (ny >= 0) & (nx >= 0) & (oy * stride == ny) & (ox * stride == nx) & (oy < hout) & (ox < wout)
    tgt = np.where(ok, (co[e] * hout + oy) * wout + ox, 0)
    ok &= live_mask[tgt]
    rptr = np.zeros(int(np.prod(in_chw)) + 1, np.int64)
    rptr[1:] = np.cumsum(np.bincount(pos[rows[ok]], minlength=rptr.size - 1))
    return rptr, tgt[ok].astype(np.int32), w[tuple(a[e[ok]] for a in widx)]


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


def _pool_rows(chw, ho: int, wo: int, k: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input position, the pooled outputs whose window [o*s - p, o*s - p + k) holds it, in
    (oy, ox) order: the targets of an event, as a row."""
    c, h, w = chw
    pos = np.arange(c * h * w)
    ch, y, x = np.unravel_index(pos, chw)
    reach = -(-k // s)  # windows that can hold one position, per axis
    cand = []
    for a in range(reach):
        for b in range(reach):
            oy, ox = (y + p) // s - (reach - 1 - a), (x + p) // s - (reach - 1 - b)
            ok = ((oy >= 0) & (oy < ho) & (ox >= 0) & (ox < wo) & (y + p >= oy * s) & (y + p < oy * s + k)
                  & (x + p >= ox * s) & (x + p < ox * s + k))
            cand.append((pos[ok], ((ch * ho + oy) * wo + ox)[ok]))
    src = np.concatenate([q for q, _ in cand])
    tgt = np.concatenate([t for _, t in cand])
    order = np.lexsort((tgt, src))
    rptr = np.zeros(pos.size + 1, np.int64)
    rptr[1:] = np.cumsum(np.bincount(src, minlength=pos.size))
    return rptr, tgt[order].astype(np.int32)


def _pool(bld: _Builder, kind: str, src: int, chw, alive: np.ndarray, k: int, s: int, p: int):
    c, h, w = chw
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = bld.new_map((c, ho, wo))
    bld.op(MAXPOOL if kind == "max" else AVGPOOL, src, out, -1, k)
    bld.table(len(bld.ops) - 1, *_pool_rows(chw, ho, wo, k, s, p))
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
