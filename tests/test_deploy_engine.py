"""The event engine (deploy/engine*.py) against the masked PyTorch network (docs/DEPLOY.md):
every layer's spikes identical, outputs equal, synaptic additions equal to the energy report's SOPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.engine import EventEngine
from deploy.engine_kernels import L_DENSE
from deploy.rundir import DeployError, open_run
from model import build_model
from model.energy_count import measure_energy
from model.layers import ConvBNSpike, LinearSpike, StaticConvBNSpike
from model.masks import NeuronMask, masked_modules, set_mask_mode

REPO = Path(__file__).resolve().parents[1]


def _random_hard(net, seed: int, keep: float = 0.5):
    """Random hard masks with a dead output channel per conv, random neurons off, BN stats that fire."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in masked_modules(net):
            if m.logits is None:
                continue
            m.logits.copy_(torch.where(torch.rand(m.logits.shape, generator=g) < keep, 1.0, -1.0))
            if not isinstance(m, NeuronMask) and m.logits.dim() == 4 and m.logits.shape[0] > 1:
                m.logits[0] = -1.0  # a dead channel
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2, generator=g)
                mod.running_var.uniform_(0.05, 0.3, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.6, generator=g)
    set_mask_mode(net, "hard")
    return net.eval()


def _torch_spikes(net, x):
    store = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: store.__setitem__(n, o))
             for n, m in net.named_modules()
             if isinstance(m, (ConvBNSpike, StaticConvBNSpike)) or (isinstance(m, LinearSpike) and m.neuron)]
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    return out, store


def _check(net, x):
    engine = EventEngine(net)
    res = engine.run(x, threads=2, record=True)
    out, ref = _torch_spikes(net, x)
    assert set(res.spikes) == set(ref)
    for name, s in res.spikes.items():
        r = ref[name].numpy().reshape(s.shape)
        assert np.array_equal(r, s), f"{name}: {int((r != s).sum())} spikes differ"
    assert np.allclose(res.out, out.numpy(), atol=1e-4)
    report = measure_energy(net, [(x, None)])
    for row in report.layers:
        if row.counted:
            got = float(res.sops[:, res.layers.index(row.name)].sum()) / x.shape[0]
            assert got == pytest.approx(row.sops_per_sample, rel=1e-12, abs=1e-9), row.name
    assert res.sops_per_sample == pytest.approx(report.sops_per_sample, rel=1e-12)
    return res


@pytest.fixture(scope="module")
def demo_images(fashion_test_images):
    return fashion_test_images[0][:8]


def test_cifar_net_exact_on_real_images(demo_images):
    torch.manual_seed(0)
    net = _random_hard(build_model("cifar10_6conv2fc", num_classes=10, T=3, width=1 / 16), 1)
    res = _check(net, demo_images)
    assert sum(int(s.sum()) for s in res.spikes.values()) > 0
    stats = EventEngine(net).program.stats
    assert stats["stage1.0.conv"]["live_neurons"] < stats["stage1.0.conv"]["neurons"]


def test_full_and_compressed_rows_both_exact(demo_images):
    """Half the masks kept: the FC layers' rows are stored full (pruned weights 0; float32, no
    BatchNorm in them); a tenth kept: compressed rows everywhere. Both give PyTorch's spikes
    and the report's SOPs. (Full float64 rows, BatchNorm folded: SEW's small late maps.)"""
    for keep, dense in ((0.5, 2), (0.1, 0)):
        torch.manual_seed(0)
        net = _random_hard(build_model("cifar10_6conv2fc", num_classes=10, T=3, width=1 / 16), 6, keep)
        lay = EventEngine(net).program.arrays["lay"]
        assert lay[-1, L_DENSE] == dense and lay[-2, L_DENSE] == dense and lay[1, L_DENSE] == 0
        _check(net, demo_images)


def test_vgg_exact_on_event_frames():
    torch.manual_seed(0)
    net = _random_hard(build_model("vggsnn_dvs", num_classes=10, T=3, width=1 / 16, input_size=32), 2)
    g = torch.Generator().manual_seed(3)
    frames = torch.poisson(torch.full((3, 3, 2, 32, 32), 0.3), generator=g)
    _check(net, frames)


def test_sew_resnet_exact():
    torch.manual_seed(0)
    net = _random_hard(build_model("sew_resnet18", num_classes=10, T=2, width=1 / 16, input_size=32), 4)
    assert 1 in EventEngine(net).program.arrays["lay"][:, L_DENSE]  # full float64 rows: late convs
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    _check(net, x)


def test_soft_masks_and_training_mode_refused():
    net = build_model("cifar10_6conv2fc", num_classes=10, T=2, width=1 / 16).eval()
    with pytest.raises(DeployError, match="soft"):
        EventEngine(net)
    set_mask_mode(net, "hard")
    with pytest.raises(DeployError, match="training mode"):
        EventEngine(net.train())


def test_bad_input_shape_one_line():
    net = _random_hard(build_model("cifar10_6conv2fc", num_classes=10, T=2, width=1 / 16), 0)
    with pytest.raises(DeployError, match="takes"):
        EventEngine(net).run(torch.zeros(1, 3, 28, 28))


def test_bad_run_dirs(tmp_path):
    with pytest.raises(DeployError, match="no such run directory"):
        open_run(tmp_path / "missing")
    (tmp_path / "r").mkdir()
    with pytest.raises(DeployError, match="config.yaml"):
        open_run(tmp_path / "r")
    (tmp_path / "r" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(DeployError, match="not finished|still in"):
        open_run(tmp_path / "r")


def test_masks_that_do_not_fit(tmp_path):
    """A finished run whose masks.spm comes from a wider network: one line naming the shape."""
    import json

    from launcher.config import load_config, save_config
    from model.masks import save_masks

    cfg = load_config(REPO / "configs" / "test_tiny.yaml")
    dst = tmp_path / "run"
    save_config(cfg, dst / "config.yaml")
    net = build_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T,
                      width=cfg.model.width, input_size=cfg.model.input_size)
    torch.save(net.state_dict(), dst / "best_model.pt")
    (dst / "results.json").write_text(json.dumps({"test_top1": 0.0}))
    wider = build_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T,
                        width=cfg.model.width * 2, input_size=cfg.model.input_size)
    save_masks(wider, dst / "masks.spm", cfg.model.name)
    with pytest.raises(DeployError, match="shape"):
        open_run(dst)
