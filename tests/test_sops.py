"""The convolution-based SOP count (model.energy_count) against an independent event-driven count.

The event-driven count scatters every nonzero input value along its kept outgoing synapses
into kept post-neurons, one event at a time, straight from the logits; it shares no code
with SOPCounter. Both must agree exactly (inputs are spike counts, or quarters after 2x2
average pooling, so float64 sums are exact).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from model import build_model
from model.energy_count import SOPCounter, fanout_map, measure_energy
from model.energy_report import EnergyReport, LayerReport
from model.layers import ConvBNSpike, LinearSpike
from model.masks import MaskedConv2d, MaskedLinear, MaskError, mask_logits, set_mask_mode

T = 3
CASES = {
    # conv, 2x2 max-pooling, FC with LIF neurons
    "cifar10_6conv2fc": (dict(width=1 / 32, input_size=8), (3, 8, 8)),
    # 2x2 average pooling (fractional inputs), event-frame first layer run T times, FC output
    "vggsnn_dvs": (dict(width=1 / 32, input_size=16), (T, 2, 16, 16)),
    # SEW ADD: integer inputs, strided 3x3 and 1x1 downsample convs
    "sew_resnet18": (dict(width=1 / 16, input_size=32), (3, 32, 32)),
    # Bottleneck blocks (1x1 -> 3x3/s -> 1x1) with ADD
    "sew_resnet50": (dict(width=1 / 16, input_size=16), (3, 16, 16)),
}
BATCHES = (3, 3, 2)  # a partial last batch: 8 samples, not 9


def lively_random_net(name: str, seed: int) -> nn.Module:
    """Tiny net with random hard masks (logits in {-1, +1}, ~70 % kept) and BN shifted so
    that every layer fires: random init alone leaves the deeper layers silent."""
    torch.manual_seed(seed)
    kw, _ = CASES[name]
    net = build_model(name, num_classes=10, T=T, **kw)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.where(torch.rand(p.shape) < 0.7, 1.0, -1.0))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1.0, 3.0)
                m.bias.uniform_(0.5, 1.5)
    set_mask_mode(net, "hard")
    return net.eval()


def make_batches(name: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    _, sample = CASES[name]
    out = []
    for n in BATCHES:
        if name == "vggsnn_dvs":  # event frames: small nonnegative counts
            x = torch.randint(0, 3, (n, *sample), generator=g).float()
        else:
            x = 2 * torch.randn((n, *sample), generator=g)
        out.append((x, torch.zeros(n, dtype=torch.long)))
    return out


def post_keeps(net: nn.Module) -> dict[nn.Module, torch.Tensor | None]:
    """Weight layer -> kept post-neurons [C, H, W] from its block's neuron-mask logits
    (None: every post-neuron kept)."""
    out = {}
    for m in net.modules():
        if isinstance(m, ConvBNSpike):
            out[m.conv] = None if m.nmask.logits is None else (m.nmask.logits > 0)
        elif isinstance(m, LinearSpike):
            out[m.fc] = None
    return out


def event_driven_sops(layer: nn.Module, post: torch.Tensor | None, inputs: list[torch.Tensor]) -> float:
    """Sum of input value x kept synapse over every input event, scattered one by one."""
    keep_w = np.ones(layer.weight.shape, bool) if layer.logits is None else (layer.logits > 0).numpy()
    total = 0.0
    if isinstance(layer, MaskedLinear):
        fan = keep_w.sum(0)  # FC post-neurons carry no neuron mask
        for x in inputs:
            for idx in np.argwhere(x.numpy() != 0):
                total += float(x[tuple(idx)]) * int(fan[idx[-1]])
        return total
    (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding
    for x in inputs:
        _, _, h_in, w_in = x.shape
        h_out, w_out = (h_in + 2 * p - k) // s + 1, (w_in + 2 * p - k) // s + 1
        post_np = np.ones((layer.out_channels, h_out, w_out), bool) if post is None else post.numpy()
        xn = x.numpy()
        for sl, c, h, w in np.argwhere(xn != 0):
            v = float(xn[sl, c, h, w])
            for kh in range(k):
                oh, r = divmod(h + p - kh, s)
                if r or not 0 <= oh < h_out:
                    continue
                for kw in range(k):
                    ow, r = divmod(w + p - kw, s)
                    if r or not 0 <= ow < w_out:
                        continue
                    total += v * int((keep_w[:, c, kh, kw] & post_np[:, oh, ow]).sum())
    return total


def first_layer_macs(layer: MaskedConv2d, in_hw: tuple[int, int]) -> int:
    """Kept (weight, in-bounds output position) pairs of one input slice."""
    keep_w = np.ones(layer.weight.shape, bool) if layer.logits is None else (layer.logits > 0).numpy()
    (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding

    def valid(n_in: int) -> list[int]:
        n_out = (n_in + 2 * p - k) // s + 1
        return [sum(0 <= o * s - p + kk < n_in for o in range(n_out)) for kk in range(k)]

    vh, vw = valid(in_hw[0]), valid(in_hw[1])
    return sum(int(keep_w[:, :, kh, kw].sum()) * vh[kh] * vw[kw] for kh in range(k) for kw in range(k))


@pytest.fixture(scope="module", params=sorted(CASES))
def measured(request):
    """(name, net, report, recorded inputs per counted layer) for one tiny random net."""
    name = request.param
    net = lively_random_net(name, seed=1)
    recorded: dict[str, list[torch.Tensor]] = {}
    handles = []
    for lname, layer in net.named_modules():
        if isinstance(layer, (MaskedConv2d, MaskedLinear)) and layer.counted:
            recorded[lname] = []
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, lst=recorded[lname]: lst.append(args[0].detach().clone())))
    report = measure_energy(net, make_batches(name, seed=2))
    for h in handles:
        h.remove()
    return name, net, report, recorded


def test_event_driven_count_equals_conv_count(measured):
    name, net, report, recorded = measured
    layers = dict(net.named_modules())
    posts = post_keeps(net)
    rows = {r.name: r for r in report.layers}
    total = 0.0
    for lname, inputs in recorded.items():
        events = event_driven_sops(layers[lname], posts[layers[lname]], inputs)
        assert rows[lname].sops_per_sample == events / 8, lname
        total += events
    assert report.samples == 8
    assert report.sops_per_sample == pytest.approx(total / 8, rel=1e-12)
    # the nets are alive where it matters: most counted layers do synaptic work
    busy = [lname for lname in recorded if rows[lname].sops_per_sample > 0]
    assert len(busy) >= 0.7 * len(recorded), busy
    if name.startswith("sew"):  # ADD makes integer inputs above 1
        assert max(float(x.max()) for xs in recorded.values() for x in xs) >= 2
    if name == "vggsnn_dvs":  # average pooling makes fractional inputs
        assert any(bool(((x > 0) & (x < 1)).any()) for xs in recorded.values() for x in xs)


def test_not_counted_layers(measured):
    name, net, report, _ = measured
    rows = {r.name: r for r in report.layers}
    first = "features.0.conv" if name == "vggsnn_dvs" else "stem.conv"
    layer = dict(net.named_modules())[first]
    slices_per_sample = T if name == "vggsnn_dvs" else 1  # the static stem runs once per image
    in_hw = CASES[name][1][-2:]
    assert rows[first].sops_per_sample == 0 and not rows[first].counted
    assert rows[first].macs_per_sample == first_layer_macs(layer, in_hw) * slices_per_sample
    assert report.first_layer_macs_per_sample == rows[first].macs_per_sample
    if name.startswith("sew"):  # the head is neither SOPs nor first-layer MACs
        assert rows["head.fc"].sops_per_sample == 0 and rows["head.fc"].macs_per_sample == 0
    assert report.energy_pj_per_sample == pytest.approx(
        0.9 * report.sops_per_sample + 4.6 * report.first_layer_macs_per_sample)


def test_firing_rates_and_keeps(measured):
    _, net, report, _ = measured
    for r in report.layers:
        assert r.firing_rate is None or 0.0 <= r.firing_rate <= 1.0
        assert 0 <= r.kept_weights <= r.total_weights and 0 <= r.kept_neurons <= r.total_neurons
        assert 0 <= r.live_connections <= r.dense_connections
    assert 0 < report.connectivity < 1 and report.connectivity_pct == 100 * report.connectivity
    assert 0.6 < report.weight_keep < 0.8 and 0.6 < report.neuron_keep < 0.8


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_fanout_map_brute_force(size, kernel, stride, padding):
    """Kept synapses out of each input position, counted by looping over every synapse."""
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, kernel, stride, padding)
    layer.mode = "hard"
    with torch.no_grad():
        layer.logits.copy_(torch.randn(layer.logits.shape))
    out = (size + 2 * padding - kernel) // stride + 1
    layer.in_hw, layer.out_hw = (size, size), (out, out)
    post = torch.rand(4, out, out) < 0.6
    fan = fanout_map(layer, post)
    keep = layer.logits > 0
    brute = torch.zeros(3, size, size, dtype=torch.float64)
    for oc in range(4):
        for oh in range(out):
            for ow in range(out):
                if not post[oc, oh, ow]:
                    continue
                for kh in range(kernel):
                    for kw in range(kernel):
                        h, w = oh * stride - padding + kh, ow * stride - padding + kw
                        if 0 <= h < size and 0 <= w < size:
                            brute[:, h, w] += keep[oc, :, kh, kw]
    assert torch.equal(fan, brute)


def test_report_json_table_plot(measured, tmp_path):
    report = dataclasses.replace(measured[2], dense_reference_sops=10 * measured[2].sops_per_sample)
    path = report.to_json(tmp_path)
    assert path.endswith("energy_report.json")
    doc = json.loads(open(path).read())
    assert doc["sops_per_sample"] == report.sops_per_sample
    assert doc["energy_ratio"] == pytest.approx(10.0)
    back = EnergyReport.from_json(path)
    assert back == report and back.energy_ratio == report.energy_ratio
    assert all(isinstance(r, LayerReport) for r in back.layers)

    table = report.table()
    lines = table.splitlines()
    assert lines[0].startswith("layer") and any(line.startswith("total") for line in lines)
    assert all(r.name in table for r in report.layers)
    body = lines[2:2 + len(report.layers)]
    assert len({len(line) for line in body}) == 1  # columns aligned
    assert "10x fewer SOPs" in table

    png = tmp_path / "energy.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = report.metrics()
    assert metrics["sops_per_sample"] == report.sops_per_sample
    assert all(isinstance(v, float) for v in metrics.values())


def test_repricing_and_ratio():
    row = LayerReport("l", "conv3x3", True, 100.0, 0.0, 0.5, 1, 2, 1, 2, 1.0, 2.0)
    first = LayerReport("f", "conv3x3", False, 0.0, 10.0, 0.5, 1, 1, 1, 1, 4.0, 4.0)
    report = EnergyReport([row, first], samples=4, weight_keep=0.5, neuron_keep=0.5)
    assert report.energy_ratio is None
    assert report.energy_pj_per_sample == pytest.approx(0.9 * 100 + 4.6 * 10)
    report.pj_per_sop, report.pj_per_mac = 1.0, 2.0
    assert report.energy_pj_per_sample == 120.0 and report.sop_energy_pj_per_sample == 100.0
    report.dense_reference_sops = 500.0
    assert report.energy_ratio == 5.0
    assert report.connectivity == 5.0 / 6.0


def test_counter_refuses_soft_masks_and_empty_runs():
    net = build_model("cifar10_6conv2fc", width=1 / 32, input_size=8, T=2)
    with pytest.raises(MaskError, match="soft"):
        with SOPCounter(net):
            pass
    set_mask_mode(net, "hard")
    with SOPCounter(net) as counter:
        pass
    with pytest.raises(ValueError, match="no samples"):
        counter.report()


def test_measure_energy_restores_state():
    net = build_model("cifar10_6conv2fc", width=1 / 32, input_size=8, T=2)
    net.train()
    batches = [(torch.randn(2, 3, 8, 8), torch.zeros(2))] * 3
    report = measure_energy(net, batches, max_batches=2)
    assert report.samples == 4
    assert net.training
    assert all(m.mode == "soft" for m in net.modules() if hasattr(m, "mode"))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


def test_dense_reference_run():
    """Masks off: the counter measures the dense network (full connectivity and keeps), and
    its SOPs give the pruned run's energy ratio on the same data."""
    net = lively_random_net("cifar10_6conv2fc", seed=3)
    batches = make_batches("cifar10_6conv2fc", seed=4)
    set_mask_mode(net, "off")
    with torch.no_grad(), SOPCounter(net) as counter:
        for x, _ in batches:
            net(x)
    dense = counter.report()
    assert dense.connectivity == 1.0 and dense.weight_keep == dense.neuron_keep == 1.0
    assert all(r.kept_weights == r.total_weights for r in dense.layers)
    pruned = measure_energy(net, batches, dense_reference_sops=dense.sops_per_sample)
    assert pruned.connectivity < 1.0
    assert pruned.energy_ratio == dense.sops_per_sample / pruned.sops_per_sample
    assert pruned.energy_ratio > 1.0


@pytest.mark.parametrize("name", ["cifar10_6conv2fc", "sew_resnet18"])
def test_firing_rates_equal_recorded_outputs(name):
    """Per-layer firing rate = mean of its block's output spikes, recorded by our own hooks
    (the counter reuses the next layer's input sums where it can: both paths are checked)."""
    net = lively_random_net(name, seed=5)
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for bname, block in net.named_modules():
        if isinstance(block, (ConvBNSpike, LinearSpike)) and block.neuron is not None:
            outputs[bname] = []
            # (skip the counter's own structural pass, which runs the blocks on alive maps)
            handles.append(block.register_forward_hook(
                lambda mod, args, out, lst=outputs[bname]: None if mod.structural else lst.append(out.clone())))
    report = measure_energy(net, make_batches(name, seed=6))
    for h in handles:
        h.remove()
    rows = {r.name: r for r in report.layers}
    for bname, outs in outputs.items():
        layer = f"{bname}.conv" if f"{bname}.conv" in rows else f"{bname}.fc"
        expected = sum(float(o.double().sum()) for o in outs) / sum(o.numel() for o in outs)
        assert rows[layer].firing_rate == pytest.approx(expected, rel=1e-6, abs=1e-12), layer
    assert any(r.firing_rate for r in report.layers)
