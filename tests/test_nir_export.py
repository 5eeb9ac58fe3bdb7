"""NIR export (docs/NIR.md): the graph, its parameter algebra, and round trips through other
frameworks' importers (Norse, SpikingJelly 2.0, snnTorch) on tiny nets with random hard masks."""

from __future__ import annotations

import json
import warnings

import nir
import numpy as np
import pytest
import torch

from deploy.export import main as export_main
from deploy.fold import fold_conv_bn
from deploy.nir_graph import DT, OR_THRESHOLD, build_graph, gt_threshold, neuron_node
from deploy.nir_import_check import compare
from model import build_model
from model.masks import NeuronMask, masked_modules, save_masks, set_mask_mode
from model.neurons import MultiStepIF, MultiStepLIF

pytest.importorskip("norse")
pytest.importorskip("snntorch")

UNIFORM = "must be uniform across all neurons"  # SpikingJelly's rule
SNNTORCH_UNIFORM = "v_threshold must be same for all neurons"
# SpikingJelly fires at v >= theta (ours), the NIR equations, Norse and snnTorch at v > theta.
FIRING = {"norse": "gt", "spikingjelly": "ge", "snntorch": "gt"}


@pytest.fixture(autouse=True)
def _seeded():
    """Networks are initialised from torch's global generator: seed it, so a test sees the
    same network whatever ran before it."""
    torch.manual_seed(0)


def harden_randomly(net, *, partial: bool, seed: int = 0, gain: float = 1.0):
    """Random hard masks: 30 % of weights, a quarter of every masked layer's channels dead and,
    if `partial`, 20 % of the other neurons; BN statistics drawn and weights scaled by `gain`
    so that every layer of a tiny net fires."""
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.weight.data.mul_(gain)
    for _, m in masked_modules(net):
        if m.logits is None:
            continue
        logits = torch.ones(m.logits.shape)
        if isinstance(m, NeuronMask):
            c = logits.shape[0]
            logits[torch.randperm(c, generator=g)[:max(1, c // 4)]] = -1.0
            if partial:
                logits[torch.rand(logits.shape, generator=g) < 0.2] = -1.0
        else:
            logits[torch.rand(logits.shape, generator=g) < 0.3] = -1.0
        m.logits.data.copy_(logits)
    for bn in net.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.3, 0.3, generator=g)
            bn.running_var.uniform_(0.5, 1.5, generator=g)
            bn.weight.data.uniform_(0.8, 1.6, generator=g)
            bn.bias.data.uniform_(-0.2, 0.6, generator=g)
    set_mask_mode(net, "hard")
    return net.eval()


@pytest.fixture(scope="module")
def fashion(fashion_test_images):
    """64 real Fashion-MNIST test images, as the demo loader gives them."""
    return fashion_test_images


def tiny_cifar(partial: bool):
    net = build_model("cifar10_6conv2fc", num_classes=10, T=3, width=1 / 32)
    return harden_randomly(net, partial=partial, gain=3.0)


def assert_exact(res, min_compared=1, output_atol=0.0):
    """Every spike of every node identical (and every node active, so that this says
    something); the output identical (vote counts) or within float rounding (real-valued)."""
    assert res.rejected is None, res.rejected
    assert res.neuron_steps_compared >= min_compared
    assert min(res.per_node_spikes.values()) > 0, res.per_node_spikes
    assert res.spike_mismatches == 0, res.per_node_mismatches
    assert res.output_max_abs_diff <= output_atol
    assert res.top1_mismatches == 0


# ------------------------------------------------------------------ parameter algebra

def _nir_euler(node, x: np.ndarray) -> np.ndarray:
    """The NIR equations, one forward-Euler step of DT per time step (x [T, ...])."""
    v = np.zeros(x.shape[1:])
    out = []
    for xt in x:
        if isinstance(node, nir.LIF):
            v = v + (DT / node.tau) * (node.v_leak - v + node.r * xt)
        else:
            v = v + DT * node.r * xt
        z = v > node.v_threshold
        v = np.where(z, node.v_reset, v)
        out.append(z.astype(np.float64))
    return np.stack(out)


@pytest.mark.parametrize("neuron", [MultiStepLIF(), MultiStepIF(), MultiStepLIF(decay_input=False)],
                         ids=["lif", "if", "lif_no_decay_input"])
def test_neuron_parameters_are_the_euler_step(neuron):
    node = neuron_node(neuron, np.ones((6,)))
    if isinstance(node, nir.LIF):
        assert np.all(node.tau / DT == neuron.tau) and np.all(node.v_leak == 0)
        assert np.all(node.r == (1.0 if neuron.decay_input else neuron.tau))
        assert np.all(1 - DT / node.tau == 0.5)  # snnTorch's beta
    else:
        assert np.all(node.r * DT == 1.0)  # SpikingJelly's rule r = 1 / dt
    x = torch.randn(40, 6, dtype=torch.float64) * 1.5
    ours = neuron(x).numpy()
    assert ours.sum() > 10
    np.testing.assert_array_equal(ours, _nir_euler(node, x.numpy()))


def test_gt_threshold_turns_nir_strict_rule_into_ours_on_float32():
    """NIR fires at v > theta'; with theta' the float32 below theta that is v >= theta for
    every float32 v, including v exactly on the threshold (which occurs: docs/NIR.md)."""
    theta = np.array([1.0, 0.5, np.inf])
    low = gt_threshold(theta)
    assert np.isinf(low[2]) and np.all(low[:2] < theta[:2])
    v = np.float32(1.0) + np.arange(-50, 50, dtype=np.float32) * np.float32(2 ** -24)
    np.testing.assert_array_equal(v > np.float32(low[0]), v >= np.float32(1.0))
    t = torch.from_numpy(v)
    assert torch.equal(t - float(low[0]) > 0, t >= 1.0)  # as Norse and snnTorch compute it


@pytest.mark.parametrize("firing", ["gt", "ge"])
def test_potential_exactly_on_the_threshold(firing):
    """x = float32(4/3) twice: H = x/2 + (x - x/2)/2 rounds to exactly 1.0 at step 2, so we
    fire there (it happened in the demo's test split); Norse (v > theta) agrees only with
    the "gt" thresholds."""
    import norse.torch

    x = torch.full((2, 1, 1), 4 / 3, dtype=torch.float32)
    ours = MultiStepLIF()(x)[:, 0, 0]
    assert ours.tolist() == [0.0, 1.0]
    thr = gt_threshold(np.ones(1)) if firing == "gt" else np.ones(1)
    graph = nir.NIRGraph.from_list(nir.Linear(weight=np.ones((1, 1), dtype=np.float32)),
                                   neuron_node(MultiStepLIF(), thr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Norse goes through nirtorch.load
        module = norse.torch.from_nir(graph, dt=DT)
    state, got = None, []
    with torch.no_grad():
        for t in range(2):
            out, state = module(x[t], state)
            got.append(float(out.flatten()[0]))
    assert (got == ours.tolist()) == (firing == "gt")


def test_or_neuron_is_an_exact_max_pool_of_spikes():
    """Sum-pool counts 0..4 into the OR LIF: a spike iff the count is >= 1, at every step."""
    node = nir.LIF(tau=np.full(5, 2 * DT), r=np.ones(5), v_leak=np.zeros(5),
                   v_threshold=np.full(5, OR_THRESHOLD), v_reset=np.zeros(5))
    counts = np.random.default_rng(0).integers(0, 5, size=(50, 5)).astype(np.float64)
    np.testing.assert_array_equal(_nir_euler(node, counts), (counts >= 1).astype(np.float64))


# ------------------------------------------------------------------ the graph itself

def test_graph_folds_bn_masks_weights_and_realises_neuron_masks(fashion):
    net = tiny_cifar(partial=True)
    graph, node_map = build_graph(net, model_name="cifar10_6conv2fc")
    x = fashion[0][:8]
    stem = graph.nodes["stem_conv"]
    with torch.no_grad():
        ref = net.stem.bn(net.stem.conv(x))
        got = torch.nn.functional.conv2d(x, torch.from_numpy(stem.weight), torch.from_numpy(stem.bias),
                                         padding=tuple(stem.padding))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    w, _ = fold_conv_bn(net.stage1[0])
    assert np.all(w[~net.stage1[0].conv.keep().numpy()] == 0)
    keep = net.stage1[0].nmask.keep().numpy()
    alive = np.flatnonzero(keep.reshape(keep.shape[0], -1).any(1))
    assert 0 < len(alive) < keep.shape[0]  # dead channels are removed from the graph
    spk = graph.nodes["stage1_0_spk"]
    assert spk.v_threshold.shape == (len(alive), *keep.shape[1:])
    np.testing.assert_array_equal(np.isinf(spk.v_threshold), ~keep[alive])
    assert graph.nodes["stage1_1_conv"].weight.shape[1] == len(alive)
    assert node_map.spiking["stage1_0_spk"].module == "stage1.0"
    assert graph.metadata["T"] == 3 and graph.metadata["dt"] == DT


def test_nir_read_gives_the_same_graph(tmp_path):
    net = tiny_cifar(partial=True)
    graph, _ = build_graph(net, model_name="cifar10_6conv2fc", metadata={"sops_per_sample": 12.5})
    nir.write(tmp_path / "g.nir", graph)
    back = nir.read(tmp_path / "g.nir")
    assert sorted(back.edges) == sorted(graph.edges)
    assert list(back.nodes) and set(back.nodes) == set(graph.nodes)
    for name, node in graph.nodes.items():
        other = back.nodes[name]
        assert type(other) is type(node)
        for key, value in node.to_dict().items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(np.asarray(other.to_dict()[key]), value, err_msg=f"{name}.{key}")
    assert float(back.metadata["sops_per_sample"]) == 12.5
    assert back.metadata["model_name"] in ("cifar10_6conv2fc", b"cifar10_6conv2fc")


def test_sew_add_is_several_edges_into_each_consumer():
    net = harden_randomly(build_model("sew_resnet18", num_classes=10, T=2, width=1 / 16, input_size=32),
                          partial=False)
    graph, _ = build_graph(net, model_name="sew_resnet18", maxpool="conv")
    into = lambda n: sorted(s for s, d in graph.edges if d == n)  # noqa: E731
    # block 1 (identity shortcut) reads block 0's output: its last spikes + the pool's OR.
    assert into("blocks_1_convs_0_conv") == ["blocks_0_convs_1_spk", "pool_or"]
    # block 2 downsamples: both its entry convs read block 1's sum of three spike sources.
    assert into("blocks_2_downsample_conv") == into("blocks_2_convs_0_conv") == [
        "blocks_0_convs_1_spk", "blocks_1_convs_1_spk", "pool_or"]
    assert isinstance(graph.nodes["head_fc"], nir.Affine)


def test_nirtorch_default_affine_drops_the_bias_but_our_importers_do_not():
    """nirtorch 2.6's default Affine mapping writes the bias to `weight.bias` (the known trap);
    the importers we use map Affine themselves and keep it."""
    import nirtorch.nir_interpreter as ni

    node = nir.Affine(weight=np.eye(3, dtype=np.float32), bias=np.array([1, 2, 3], dtype=np.float32))
    trap = ni._default_map_affine(node)
    assert not torch.equal(trap.bias.detach(), torch.tensor([1.0, 2.0, 3.0]))
    net = harden_randomly(build_model("sew_resnet18", num_classes=10, T=2, width=1 / 16, input_size=32),
                          partial=False)
    graph, _ = build_graph(net, model_name="sew_resnet18", maxpool="conv")
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    head = import_from_nir(graph, dt=DT).get_submodule("head_fc")
    torch.testing.assert_close(head.bias.detach(), net.head.fc.bias.detach())


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("framework", ["norse", "spikingjelly", "snntorch"])
def test_cifar_round_trip_channel_masks(fashion, framework):
    net = tiny_cifar(partial=False)
    graph, node_map = build_graph(net, model_name="cifar10_6conv2fc", firing=FIRING[framework])
    res = compare(net, graph, node_map, framework, [fashion])
    assert_exact(res, 64 * 3 * 1000)


def test_cifar_round_trip_partial_neuron_masks(fashion):
    """Per-neuron +inf thresholds: Norse runs them exactly, the uniform-threshold importers refuse."""
    net = tiny_cifar(partial=True)
    graph, node_map = build_graph(net, model_name="cifar10_6conv2fc")
    assert_exact(compare(net, graph, node_map, "norse", [fashion]), 64 * 3 * 1000)
    assert UNIFORM in compare(net, graph, node_map, "spikingjelly", [fashion]).rejected
    assert SNNTORCH_UNIFORM in compare(net, graph, node_map, "snntorch", [fashion]).rejected


def _uniform_thresholds(graph) -> bool:
    return all(np.all(np.isfinite(n.v_threshold)) and np.unique(n.v_threshold).size == 1
               for n in graph.nodes.values() if isinstance(n, (nir.LIF, nir.IF)))


@pytest.mark.parametrize("framework", ["norse", "spikingjelly", "snntorch"])
def test_cifar_round_trip_partial_neuron_masks_unrolled(fashion, framework):
    """The other exact encoding: uniform thresholds, masked neurons' outgoing weights zero in
    convs and pools unrolled into Linear / Affine nodes; every importer runs it exactly."""
    net = tiny_cifar(partial=True)
    graph, node_map = build_graph(net, model_name="cifar10_6conv2fc", firing=FIRING[framework],
                                  neuron_masks="unroll")
    assert _uniform_thresholds(graph)
    assert isinstance(graph.nodes["stage1_1_conv"], nir.Affine)  # stage1.0 is partially masked
    assert graph.metadata["neuron_masks"] == "unroll"
    assert_exact(compare(net, graph, node_map, framework, [fashion]), 64 * 3 * 1000)


def test_unrolled_conv_holds_the_conv_weights_exactly():
    from deploy.nir_graph import _unrolled

    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 3, 3, generator=g)
    x = torch.randn(2, 3, 7, 6, generator=g)
    m = _unrolled(w.numpy(), (3, 7, 6), (2, 1), (1, 1), (1, 1))
    ref = torch.nn.functional.conv2d(x, w, None, (2, 1), (1, 1))
    torch.testing.assert_close(torch.from_numpy(m) @ x.reshape(2, -1).T, ref.reshape(2, -1).T)
    # an interior output reads exactly its 27 weights
    row = m.reshape(5, 4, 6, 3, 7, 6)[4, 2, 3]
    assert np.array_equal(row[:, 3:6, 2:5], w[4].numpy())
    assert np.count_nonzero(row) == np.count_nonzero(w[4].numpy())
    gate = np.ones((3, 7, 6), dtype=bool)
    gate[1, 4, 3] = False
    gated = _unrolled(w.numpy(), (3, 7, 6), (2, 1), (1, 1), (1, 1), gate)
    assert not gated.reshape(-1, 3, 7, 6)[:, 1, 4, 3].any()
    assert np.array_equal(gated.reshape(-1, 3, 7, 6)[:, 0], m.reshape(-1, 3, 7, 6)[:, 0])


def test_sew_refuses_the_unrolled_encoding():
    from deploy.nir_graph import NIRExportError

    net = harden_randomly(build_model("sew_resnet18", num_classes=10, T=2, width=1 / 16, input_size=32),
                          partial=True)
    with pytest.raises(NIRExportError, match="SEW-ResNet"):
        build_graph(net, model_name="sew_resnet18", neuron_masks="unroll")


@pytest.mark.parametrize("avgpool,frameworks", [("sum", ["norse", "spikingjelly", "snntorch"]),
                                                ("avg", ["spikingjelly", "snntorch"])])
def test_vgg_round_trip(avgpool, frameworks):
    net = harden_randomly(build_model("vggsnn_dvs", num_classes=10, T=3, width=1 / 16, input_size=16),
                          partial=False, gain=6.0)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(16, 3, 2, 16, 16, generator=g) < 0.3).float()
    batch = (x, torch.zeros(16, dtype=torch.long))
    for fw in frameworks:
        graph, node_map = build_graph(net, model_name="vggsnn_dvs", avgpool=avgpool, firing=FIRING[fw])
        assert_exact(compare(net, graph, node_map, fw, [batch]), 16 * 3 * 100, output_atol=1e-4)


def test_vgg_partial_masks_last_layer_folded_into_fc():
    net = harden_randomly(build_model("vggsnn_dvs", num_classes=10, T=3, width=1 / 16, input_size=16),
                          partial=True, gain=6.0)
    graph, node_map = build_graph(net, model_name="vggsnn_dvs")
    last = [n for n in graph.nodes if n.endswith("_spk")][-1]
    assert np.all(np.isfinite(graph.nodes[last].v_threshold))  # zero outgoing weights instead
    assert ("features_10_spk", "fc_flat") in graph.edges
    x = (torch.rand(16, 3, 2, 16, 16, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    assert_exact(compare(net, graph, node_map, "norse", [(x, torch.zeros(16, dtype=torch.long))]), 1000,
                 output_atol=1e-4)
    for fw in ("spikingjelly", "snntorch"):
        graph, node_map = build_graph(net, model_name="vggsnn_dvs", firing=FIRING[fw], neuron_masks="unroll")
        assert _uniform_thresholds(graph)
        assert_exact(compare(net, graph, node_map, fw, [(x, torch.zeros(16, dtype=torch.long))]), 1000,
                     output_atol=1e-4)


@pytest.mark.slow
def test_sew_round_trip(fashion):
    """SEW (IF, ADD, padded max-pool): SpikingJelly exact with the one-hot-conv max-pool;
    the SumPool2d encoding is correct NIR but nirtorch's mapping drops its padding."""
    net = harden_randomly(build_model("sew_resnet18", num_classes=10, T=2, width=1 / 16, input_size=32),
                          partial=False)
    batch = (fashion[0][:32], fashion[1][:32])
    graph, node_map = build_graph(net, model_name="sew_resnet18", maxpool="conv", firing="ge")
    assert_exact(compare(net, graph, node_map, "spikingjelly", [batch]), 32 * 2 * 1000)
    assert "r != 1" in compare(net, graph, node_map, "snntorch", [batch]).rejected
    graph, node_map = build_graph(net, model_name="sew_resnet18", maxpool="sum")
    assert compare(net, graph, node_map, "spikingjelly", [batch]).rejected is not None


# ------------------------------------------------------------------ the command line

def _finished_run(tmp_path, masks: bool = True):
    """A run directory as the trainer leaves it, for a tiny hardened 6Conv2FC."""
    from launcher.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("configs/test_tiny.yaml", [f"checkpoint.run_dir={run}", "tracking.enabled=false",
                                                 "model.width=0.03125"])
    net = build_model(cfg.model.name, num_classes=10, T=cfg.model.T, width=cfg.model.width,
                      input_size=cfg.model.input_size)
    harden_randomly(net, partial=True)
    save_config(cfg, run / "config.yaml")
    torch.save(net.state_dict(), run / "best_model.pt")
    (run / "results.json").write_text(json.dumps({"test_top1": 0.5, "sops_per_sample": 1234.0,
                                                  "connectivity": 0.1}))
    if masks:
        save_masks(net, run / "masks.spm", cfg.model.name)
    return run


def test_cli_writes_a_readable_file(tmp_path, capsys):
    run = _finished_run(tmp_path)
    out = tmp_path / "net.nir"
    assert export_main([str(run), "--format", "nir", "--out", str(out)]) == 0
    graph = nir.read(out)
    assert float(graph.metadata["sops_per_sample"]) == 1234.0
    assert isinstance(graph.nodes["stem_spk"], nir.LIF)
    assert graph.metadata["neuron_masks"] == "threshold"
    assert export_main([str(run), "--format", "nir", "--out", str(out), "--neuron-masks", "unroll"]) == 0
    assert nir.read(out).metadata["neuron_masks"] == "unroll"


@pytest.mark.parametrize("case", ["no_masks", "format", "no_dir", "is_dir"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case):
    run = _finished_run(tmp_path, masks=case != "no_masks")
    out = {"no_dir": tmp_path / "missing" / "x.nir", "is_dir": tmp_path}.get(case, tmp_path / "x.nir")
    fmt = "onnx" if case == "format" else "nir"
    assert export_main([str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    expected = {"no_masks": "no hardened network", "format": "unknown format", "no_dir": "cannot write",
                "is_dir": "is a directory"}[case]
    assert expected in err
    assert not (tmp_path / "x.nir").exists()
