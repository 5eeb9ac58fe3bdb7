"""Budget mode's controller on a real (small) network: calibration lands in its band and keeps
the "kept iff alpha > 0" rule; observation steers lambda the right way.
The end-to-end landing on the demo data is tests/test_sweep.py::test_budget_mode_lands_within_ten_percent
(SOPs) and tests/test_sweep.py::test_energy_budget_sweep_puts_each_trial_on_its_budget (energy)."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.budget import BudgetController
from model import build_model
from model.energy_count import measure_energy
from model.masks import keep_ratios, mask_logits, set_mask_mode


def small_net(seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("cifar10_6conv2fc", num_classes=10, T=2, width=1 / 16, input_size=16)
    set_mask_mode(net, "hard")
    return net


def set_logits(net, fill=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.full_like(p, fill) if fill is not None else torch.randn(p.shape, generator=g))


def sops(net, batches) -> float:
    return measure_energy(net, batches).sops_per_sample


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.rand(8, 3, 16, 16, generator=g) * 4,) for _ in range(2)]


@pytest.mark.parametrize("fraction", [0.2, 0.6])
def test_calibrate_lands_in_band_from_above_and_below(batches, fraction):
    net = small_net()
    set_logits(net, fill=1.0)
    dense = sops(net, batches)
    assert dense > 0
    budget = fraction * dense
    for offset in (1.5, -1.5):  # most logits kept: over the budget; few kept: under it
        set_logits(net)
        with torch.no_grad():
            for p in mask_logits(net):
                p.add_(offset)
        before = sops(net, batches)
        assert before > budget if offset > 0 else before < 0.95 * budget
        found = BudgetController(budget, 1e-11, 1e-11).calibrate(net, batches)
        after = sops(net, batches)
        assert after == pytest.approx(found["budget_sops_after"], rel=1e-6)
        if found["budget_in_band"]:
            assert 0.95 * budget <= after <= budget, (offset, before, after, found)
        else:  # SOPs jumped over the band between two adjacent logits: the closest under it
            assert 0.9 * budget <= after <= budget, (offset, before, after, found)
        assert found["budget_calibration_iters"] < 30, found
        assert found["budget_sops_before"] == pytest.approx(before, rel=1e-6)


def test_calibrate_stops_when_no_logit_lies_between_its_bounds(batches):
    """Masks that share one logit move together: with two logit values there are three kept
    sets, and a budget between two of them is answered by the one under it after measuring both,
    even when the one over it is closer, not after a bisection that can never land in the band."""
    net = small_net()
    g = torch.Generator().manual_seed(3)
    signs = [torch.where(torch.rand(p.shape, generator=g) < 0.5, 1.0, -1.0) for p in mask_logits(net)]

    def halve():
        with torch.no_grad():
            for p, s in zip(mask_logits(net), signs):
                p.copy_(s)

    halve()
    half = sops(net, batches)
    set_logits(net, fill=1.0)
    dense = sops(net, batches)
    assert half < 0.9 * dense
    for budget in (0.99 * dense, (half * dense) ** 0.5):  # 1 % from the dense side, far from both
        halve()
        found = BudgetController(budget, 1e-11, 1e-11).calibrate(net, batches)
        assert found["budget_calibration_iters"] == 1 and found["budget_in_band"] == 0.0, found
        assert sops(net, batches) == pytest.approx(half, rel=1e-6)
        assert found["budget_sops_after"] == pytest.approx(half, rel=1e-6)


def test_calibrate_above_dense_keeps_everything(batches):
    net = small_net()
    set_logits(net)
    found = BudgetController(1e12, 1e-11, 1e-11).calibrate(net, batches)
    assert keep_ratios(net) == (1.0, 1.0) and found["budget_tau"] < 0


def test_target_descends_from_the_dense_network_to_the_budget(batches):
    """The first observation measures the dense network; the target then falls geometrically
    to the budget over the first `ramp` of the search and stays there."""
    x = batches[0][0]
    net = small_net()
    set_logits(net)
    before = [p.detach().clone() for p in mask_logits(net)]
    ctl = BudgetController(10.0, 1e-11, 1e-11, ramp=0.5)
    assert ctl.target(0.0) == 10.0  # nothing measured yet
    ctl.observe(net, x, progress=0.0)
    assert all(torch.equal(p, q) for p, q in zip(mask_logits(net), before))  # logits restored
    set_logits(net, fill=1.0)  # every mask kept: the dense network
    assert ctl.start_sops == pytest.approx(sops(net, [(x,)]), rel=1e-6) and ctl.start_sops > 10.0
    assert ctl.target(0.0) == pytest.approx(ctl.start_sops)
    assert ctl.target(0.25) == pytest.approx(math.sqrt(ctl.start_sops * 10.0))
    assert ctl.target(0.5) == ctl.target(0.9) == pytest.approx(10.0)
    again = BudgetController(10.0, 1e-11, 1e-11, ramp=0.5)
    again.load_state_dict(ctl.state_dict())
    assert again.start_sops == ctl.start_sops


def test_observe_moves_lambda_towards_the_budget(batches):
    x = batches[0][0]
    net = small_net()
    set_logits(net)
    for budget, up in ((1.0, True), (1e12, False)):  # far over it / far under it
        ctl = BudgetController(budget, 2e-11, 1e-11, every=10, lr=1.0)
        assert ctl.observe(net, x) == pytest.approx(sops(net, [(x,)]), rel=1e-6)
        lw, ln = ctl.lambdas()
        assert lw / ln == pytest.approx(2.0)  # the configured ratio is kept
        assert lw == pytest.approx(2e-11 * (math.e if up else 1 / math.e))  # clipped step
        again = BudgetController(budget, 2e-11, 1e-11)
        again.load_state_dict(ctl.state_dict())
        assert again.lambdas() == ctl.lambdas()


def test_calibrate_lands_an_energy_budget_under_a_named_model(batches):
    """Energy mode: the same calibration, measuring pJ per sample under `loihi` (SOPs and neuron
    updates priced), lands in its band; the SOPs of the same measurements are reported beside."""
    net = small_net()
    set_logits(net, fill=1.0)
    dense = measure_energy(net, batches)
    floor_net = small_net()
    set_logits(floor_net, fill=-1.0)
    floor = measure_energy(floor_net, batches).model_energy_pj("loihi")  # what no mask removes
    budget = floor + 0.3 * (dense.model_energy_pj("loihi") - floor)
    set_logits(net)
    ctl = BudgetController(budget, 1e-11, 1e-11, energy_model="loihi")
    found = ctl.calibrate(net, batches)
    after = measure_energy(net, batches)
    assert after.model_energy_pj("loihi") == pytest.approx(found["budget_energy_pj_after"], rel=1e-6)
    assert after.sops_per_sample == pytest.approx(found["budget_sops_after"], rel=1e-6)
    assert abs(found["budget_energy_pj_after"] / budget - 1) < 0.05, found
    assert ctl.observe(net, batches[0][0]) == pytest.approx(
        measure_energy(net, [batches[0]]).model_energy_pj("loihi"), rel=1e-6)


def test_energy_budget_config():
    """pruning.energy_budget_pj and pruning.sop_budget exclude each other; the model is named."""
    import typing

    from launcher.config import ConfigError, PruningConfig, from_dict
    from model.energy_models import MODELS

    assert typing.get_args(typing.get_type_hints(PruningConfig)["energy_model"]) == tuple(MODELS)
    cfg = from_dict({"pruning": {"energy_budget_pj": 1e6, "energy_model": "spinnaker2"}})
    assert cfg.pruning.energy_model == "spinnaker2" and cfg.pruning.sop_budget is None
    assert from_dict({}).pruning.energy_model == "horowitz45"
    with pytest.raises(ConfigError, match="pruning.energy_budget_pj: set pruning.sop_budget or"):
        from_dict({"pruning": {"energy_budget_pj": 1e6, "sop_budget": 4e4}})
    with pytest.raises(ConfigError, match="pruning.energy_model"):
        from_dict({"pruning": {"energy_model": "truenorth"}})
    with pytest.raises(ValueError, match="unknown energy model"):
        BudgetController(1e6, 1e-11, 1e-11, energy_model="truenorth")


def test_reestimated_batchnorm_is_the_mean_of_the_batch_statistics(batches):
    """After a calibration moves the kept set: running mean / variance of every BatchNorm = the
    mean over the batches of that layer's batch mean / unbiased variance, with the network as
    it is now; momentum and modes are restored."""
    from launcher.train import reestimate_batchnorm

    net = small_net().eval()
    set_logits(net)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    seen = {id(m): [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen[id(mod)].append(a[0].detach().clone())) for m in bns]
    reestimate_batchnorm(net, batches)
    for h in hooks:
        h.remove()
    for m in bns:
        xs = seen[id(m)]
        assert len(xs) == len(batches)
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        assert torch.allclose(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(m.running_var, var, rtol=1e-5, atol=1e-6)
        assert m.momentum == 0.1 and not m.training
    assert not net.training
