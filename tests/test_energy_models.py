"""Our counts against counters no one here wrote (docs/ENERGY.md, "Cross-checks").

NeuroBench's `SynapticOperations`, `MembraneUpdates` and `NeuronOperations` run on the very
networks our counter measures, on the same batches. Where the definitions agree the numbers
are equal; where they differ, each test names the difference and checks it exactly:
- NeuroBench binarises every input and counts into every output position, pruned post-neurons
  included; a layer call whose input holds anything but 0 / +-1 is all MACs (SEW sums, average
  pooling, the pixels of the first layer, the SEW head); zero-valued pixels cost it nothing.
- It counts a membrane update wherever a membrane changed (pruned neurons included); we count
  every kept neuron at every step.
SpikingJelly's Lemaire profiler gives the memory-cost curve our `lemaire` model uses. snnTorch
1.0.0 (the release on the package index) ships no energy-estimation module: nothing to check.
"""

from __future__ import annotations

import pytest
import snntorch as snn
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from model import build_model
from model.energy_count import SOPCounter, fanout_map, measure_energy
from model.energy_models import MODELS, energy_model, memory_pj_per_byte
from model.energy_report import EnergyReport
from model.layers import ConvBNSpike, LinearSpike
from model.masks import MaskedConv2d, MaskedLinear, NeuronMask, set_mask_mode, weight_layers
from tests.test_sops import CASES, lively_random_net, make_batches

neurobench = pytest.importorskip("neurobench")
from neurobench.benchmarks import Benchmark  # noqa: E402
from neurobench.metrics.workload import MembraneUpdates, NeuronOperations, SynapticOperations  # noqa: E402
from neurobench.models import TorchModel  # noqa: E402


def keep_every_neuron(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NeuronMask) and m.logits is not None:
                m.logits.fill_(1.0)
    return net


def neurobench_run(net: nn.Module, batches, metrics: list) -> dict:
    """NeuroBench's own Benchmark loop over our batches (8 samples: sums stay exact)."""
    x = torch.cat([b[0] for b in batches])
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=len(batches[0][0]))
    model = TorchModel(net)
    model.add_activation_module(snn.SpikingNeuron)
    bench = Benchmark(model, loader, [], [], [[], metrics])
    try:
        return bench.run(quiet=True)
    finally:
        model.cleanup_hooks()


def recorded_inputs(net: nn.Module, batches) -> dict[str, list[torch.Tensor]]:
    """Every weight layer's input, per batch, from one eval pass with hard masks."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in weight_layers(net)}
    handles = [layer.register_forward_pre_hook(lambda m, a, lst=out[name]: lst.append(a[0].detach().clone()))
               for name, layer in weight_layers(net)]
    try:
        with torch.no_grad():
            for x, _ in batches:
                net(x)
    finally:
        for h in handles:
            h.remove()
    return out


def events(layer, inputs: torch.Tensor, post: torch.Tensor | None = None) -> float:
    """Kept synapses out of the True positions of `inputs` (one layer call) into the post-neurons
    in `post` (default: every output position, as NeuroBench counts), by our fan-out map."""
    dims = tuple(range(inputs.dim() - (3 if isinstance(layer, MaskedConv2d) else 1)))
    if post is None:
        post = torch.ones(layer.out_features if isinstance(layer, MaskedLinear)
                          else (layer.out_channels, *layer.out_hw), dtype=torch.bool)
    return float((inputs.sum(dims).double() * fanout_map(layer, post)).sum())


def is_spikes(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1) | (x == -1)).all())


@pytest.mark.parametrize("name", sorted(CASES))
def test_synaptic_operations_equal_neurobench(name):
    """Every neuron kept: NeuroBench's effective ACs and MACs, from its binary-copy convolutions,
    equal our event counts layer call by layer call. On 6Conv2FC (spike inputs, nonzero pixels)
    that is our SOPs and first-layer MACs themselves; elsewhere the named differences."""
    net = keep_every_neuron(lively_random_net(name, seed=1))
    batches = make_batches(name, seed=2)
    nb = neurobench_run(net, batches, [SynapticOperations])
    report = measure_energy(net, batches)
    rows, layers = {r.name: r for r in report.layers}, dict(weight_layers(net))
    ac = mac = 0.0
    for lname, xs in recorded_inputs(net, batches).items():
        per_call = [events(layers[lname], x != 0) for x in xs]
        ac += sum(e for e, x in zip(per_call, xs) if is_spikes(x))
        mac += sum(e for e, x in zip(per_call, xs) if not is_spikes(x))
        if rows[lname].counted:  # our counter's events are the same count (every neuron is kept)
            assert rows[lname].synaptic_events_per_sample == sum(per_call) / 8, lname
            graded = any(not is_spikes(x) for x in xs)
            assert (rows[lname].graded_events_per_sample > 0) == graded, lname
            if not graded:
                assert rows[lname].sops_per_sample == rows[lname].synaptic_events_per_sample, lname
    assert nb["SynapticOperations"]["Effective_ACs"] == ac / 8
    assert nb["SynapticOperations"]["Effective_MACs"] == mac / 8
    if name == "cifar10_6conv2fc":
        assert nb["SynapticOperations"]["Effective_ACs"] == report.sops_per_sample > 0
        assert nb["SynapticOperations"]["Effective_MACs"] == report.first_layer_macs_per_sample > 0
    if name.startswith("sew"):  # SEW sums: MACs to NeuroBench, value-weighted SOPs to us
        assert report.total("graded_events_per_sample") > 0
        assert report.sops_per_sample > report.total("synaptic_events_per_sample")


def test_pruned_neurons_and_zero_pixels_differ_exactly():
    """NeuroBench counts synapses into neurons a neuron mask removed, and skips zero pixels in
    the first layer's MACs; we do neither. The differences, counted on their own, close the gap."""
    net = lively_random_net("cifar10_6conv2fc", seed=3)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.relu(2 * torch.randn(n, 3, 8, 8, generator=g)), None) for n in (3, 3, 2)]
    nb = neurobench_run(net, batches, [SynapticOperations])["SynapticOperations"]
    report = measure_energy(net, batches)
    layers = dict(weight_layers(net))
    nmasks = {m.conv: m.nmask for m in net.modules() if isinstance(m, ConvBNSpike) and m.nmask.logits is not None}
    into_pruned = zero_pixels = 0.0
    for lname, xs in recorded_inputs(net, batches).items():
        layer = layers[lname]
        if layer in nmasks:
            into_pruned += sum(events(layer, x != 0, ~nmasks[layer].keep()) for x in xs)
        if not layer.counted:
            zero_pixels += sum(events(layer, x == 0) for x in xs)
    assert into_pruned > 0 and zero_pixels > 0  # both differences are present
    assert nb["Effective_ACs"] == report.sops_per_sample + into_pruned / 8
    assert nb["Effective_MACs"] == report.first_layer_macs_per_sample - zero_pixels / 8


def test_dense_reference_equals_neurobench_dense():
    """Masks off, every input taken as on: NeuroBench's "Dense" operations are our dense
    connections, each layer run once per input slice (T for the spiking layers, 1 for the stem)."""
    net = lively_random_net("cifar10_6conv2fc", seed=5)
    set_mask_mode(net, "off")
    batches = make_batches("cifar10_6conv2fc", seed=6)
    nb = neurobench_run(net, batches, [SynapticOperations])["SynapticOperations"]
    with torch.no_grad(), SOPCounter(net) as counter:
        for x, _ in batches:
            net(x)
    dense = counter.report()
    expected = dense.total("dense_macs_per_sample") + sum(r.dense_connections * net.T for r in dense.layers if r.counted)
    assert nb["Dense"] == expected


class LeakySeq(nn.Module):
    """snnTorch's Leaky run over x_seq [T, N, ...], with a small bias current so that every
    membrane moves at every step (NeuroBench counts an update only where one does)."""

    def __init__(self):
        super().__init__()
        self.lif = snn.Leaky(beta=0.5, threshold=1.0, reset_mechanism="subtract")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self.lif.reset_mem()
        return torch.stack([self.lif(x + 0.05)[0] for x in x_seq])


def test_neuron_updates_equal_neurobench_membrane_updates():
    """A shared network whose neurons are snnTorch's: NeuroBench's membrane updates and its
    dense neuron operations (4 per Leaky update with subtract reset) equal our dense neuron
    updates; our effective count leaves out the neurons a neuron mask removed, every step."""
    net = lively_random_net("cifar10_6conv2fc", seed=7)
    for m in net.modules():
        if isinstance(m, (ConvBNSpike, LinearSpike)) and m.neuron is not None:
            m.neuron = LeakySeq()
    batches = make_batches("cifar10_6conv2fc", seed=8)
    nb = neurobench_run(net, batches, [MembraneUpdates, NeuronOperations])
    report = measure_energy(net, batches)
    dense = report.total("neuron_updates_per_sample")
    assert dense == sum(r.total_neurons * net.T for r in report.layers) > 0
    assert nb["MembraneUpdates"] == dense
    assert nb["NeuronOperations"]["Neuron Dense Ops"] == 4 * dense
    assert nb["NeuronOperations"]["Effective Neuron Ops"] == 4 * dense
    pruned = sum((r.total_neurons - r.kept_neurons) * net.T for r in report.layers)
    assert pruned > 0 and report.total("live_neuron_updates_per_sample") == dense - pruned
    for r in report.layers:
        assert r.spikes_per_sample == pytest.approx((r.firing_rate or 0.0) * r.neuron_updates_per_sample, rel=1e-9)


def test_memory_cost_curve_equals_spikingjelly():
    """The `lemaire` model's SRAM cost per byte by buffer size is SpikingJelly 2.x's."""
    from spikingjelly.activation_based.op_counter.analytical_energy import LemaireEnergyCostConfig

    cost = LemaireEnergyCostConfig()
    lemaire = energy_model("lemaire")
    assert (lemaire.pj_add, lemaire.pj_mul) == (cost.e_add_pj, cost.e_mul_pj)
    for capacity in (0, 100, 4000, 8192, 20_000, 32_768, 500_000, 1 << 20, 1 << 24):
        assert memory_pj_per_byte(capacity) == pytest.approx(cost.memory_cost_pj(capacity), rel=1e-12)


def test_named_models_price_the_report(tmp_path):
    """horowitz45 is the paper's figure bit for bit; every model prices every layer; the dense
    ratio comes from the dense run's own figures when given, else from its SOPs and our
    structure (first-layer MACs and neuron updates do not depend on training)."""
    net = lively_random_net("sew_resnet18", seed=9)
    report = measure_energy(net, make_batches("sew_resnet18", seed=10), dense_reference_sops=1e6)
    assert report.model_energy_pj("horowitz45") == report.energy_pj_per_sample
    loihi = report.model_energy_pj("loihi")
    assert loihi == pytest.approx(27.1 * report.sops_per_sample + 4.6 * report.first_layer_macs_per_sample
                                  + 81 * report.total("live_neuron_updates_per_sample"), rel=1e-12)
    for m in MODELS:
        per_layer = sum(sum(r.energy_pj(m).values()) for r in report.layers)
        assert per_layer == pytest.approx(report.model_energy_pj(m), rel=1e-9), m
    assert report.model_ratio("loihi") == pytest.approx(
        (27.1e6 + 4.6 * report.total("dense_macs_per_sample") + 81 * report.total("neuron_updates_per_sample"))
        / loihi, rel=1e-12)
    assert report.model_ratio("lemaire") is None  # needs the dense run's own events
    report.dense_reference_pj = {"lemaire": 2 * report.model_energy_pj("lemaire")}
    assert report.model_ratio("lemaire") == pytest.approx(2.0)
    metrics = report.metrics()
    assert all(f"energy_pj_per_sample/{m}" in metrics for m in MODELS)
    assert EnergyReport.from_json(report.to_json(tmp_path)) == report
    table = report.table()
    assert all(m in table for m in MODELS) and "2x" in table
    with pytest.raises(ValueError, match="unknown energy model"):
        energy_model("truenorth")


