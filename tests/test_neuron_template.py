"""The test to copy for a new neuron model (docs/DESIGN.md, "Adding a neuron model").

A new model is checked two ways: against dynamics written out by hand on a few steps, and,
once it has a fused charge rule in model/neurons.py, fused against its `MultiStepNeuron`
version (spikes equal, gradients to rounding). Here the template's own LIF and IF are held
to the fused neurons, which also proves the template right."""
from __future__ import annotations

import pytest
import torch

from model.neuron_base import MultiStepNeuron
from model.neurons import MultiStepIF, MultiStepLIF


class TemplateLIF(MultiStepNeuron):
    def __init__(self, tau: float = 2.0, **kw):
        super().__init__(**kw)
        self.tau = tau

    def charge(self, v, x):
        return v + (x - (v - self.v_reset)) / self.tau


class TemplateIF(MultiStepNeuron):
    def charge(self, v, x):
        return v + x


def test_hand_written_steps():
    """LIF tau 2 at constant input 1.2: V 0.6, 0.9, 1.05 (fire, reset), 0.6."""
    out = TemplateLIF()(torch.full((4, 1), 1.2)).flatten().tolist()
    assert out == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("pair", [(TemplateLIF, MultiStepLIF), (TemplateIF, MultiStepIF)], ids=["lif", "if"])
def test_fused_equals_template(pair, detach_reset):
    template, fused = pair[0](detach_reset=detach_reset), pair[1](detach_reset=detach_reset)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 50, generator=g, dtype=torch.float64) * 1.5 + 0.6)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for node in (template, fused):
        xi = x.clone().requires_grad_()
        s = node(xi)
        (gx,) = torch.autograd.grad(s, xi, grad_out)
        results.append((s.detach(), gx))
    (s_t, g_t), (s_f, g_f) = results
    assert 0.05 < s_f.mean().item() < 0.6  # not a vacuous comparison
    assert torch.equal(s_t, s_f)
    torch.testing.assert_close(g_t, g_f, rtol=1e-10, atol=1e-12)
