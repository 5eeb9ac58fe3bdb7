"""Connectivity and penalty coefficients on hand-built nets, the beta schedule, hard masks,
where the penalty's gradients go, and the weights-only / neurons-only ablations."""

from __future__ import annotations

import math

import pytest
import torch

from model import build_model
from model.base import SpikingNet, sequential_consumers
from model.layers import ConvBNSpike, LinearSpike, SeqPool, StaticConvBNSpike
from model.sew_resnet import _SEWBlock
from model.masks import (MaskedConv2d, MaskedLinear, NeuronMask, harden, mask_logits, set_mask_mode,
                         weight_params)
from model.penalty import energy_penalty, penalty_terms
from model.schedules import beta_at
from model.structure import connectivity


class TwoConvNet(SpikingNet):
    """[N, 2, 6, 6] -> conv3x3/1 (2->3) @6x6 -> conv3x3/2 (3->4) -> 3x3 -> FC 36->5, T = 2."""

    def __init__(self):
        super().__init__()
        self.T, self.num_classes, self.input_shape = 2, 5, (2, 6, 6)
        self.conv1 = ConvBNSpike(2, 3, 3, 1)
        self.conv2 = ConvBNSpike(3, 4, 3, 2, 1)
        self.fc = LinearSpike(36, 5, neuron=None)
        self.finalize()

    def forward(self, x):
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        return self.fc(self.conv2(self.conv1(x_seq)).flatten(2))

    def consumers(self):
        return sequential_consumers([self.conv1, self.conv2, self.fc])


def test_coefficients_by_hand():
    net = TwoConvNet()
    terms = penalty_terms(net)
    e_w = {id(m): e for m, e in terms.weights}
    e_n = {id(m): e for m, e in terms.neurons}
    # e_w = H_in W_in / stride^2 (FC: 1)
    assert e_w == {id(net.conv1.conv): 36.0, id(net.conv2.conv): 9.0, id(net.fc.fc): 1.0}
    # e_n = dense fan-out into the consumer: C_out k k / s^2 (FC: out_features)
    assert e_n == {id(net.conv1.nmask): 4 * 9 / 4, id(net.conv2.nmask): 5.0}
    assert net.conv1.nmask.logits.shape == (3, 6, 6) and net.conv2.nmask.logits.shape == (4, 3, 3)
    assert terms.sums() == {"weights": 36 * 54 + 9 * 108 + 1 * 180, "neurons": 9 * 108 + 5 * 36}


def test_connectivity_by_hand():
    net = TwoConvNet()
    with torch.no_grad():
        for p in mask_logits(net):
            p.fill_(1.0)
        # conv1 keeps one synapse: out channel 0 <- in channel 0, centre tap
        net.conv1.conv.logits.fill_(-1.0)
        net.conv1.conv.logits[0, 0, 1, 1] = 1.0
        # and drops the top row of its channel-0 neurons
        net.conv1.nmask.logits[0, 0, :] = -1.0
        # the FC drops every synapse out of feature 0
        net.fc.fc.logits[:, 0] = -1.0
    conn = connectivity(net)
    # dense, padding excluded: per axis, 3x3/1 over 6 has 3*6-2 = 16 taps; 3x3/2 over 6 -> 3 has
    # 2 + 3 + 3 = 8 taps
    assert conn.dense == {"conv1.conv": 16 * 16 * 2 * 3, "conv2.conv": 8 * 8 * 3 * 4, "fc.fc": 36 * 5}
    # conv1: every output of channel 0 sees its centre; rows 1..5 kept -> 30 live connections
    # conv2: only rows 1..5 of input channel 0 are alive; rows seen per output row: 1, 3, 3 (= 7),
    #        columns 8 taps as in the dense count -> 7 * 8 per output channel, all 4 kept
    # fc: every input of conv2's output is alive (each output row sees an alive row), 5 removed
    assert conn.live == {"conv1.conv": 30, "conv2.conv": 7 * 8 * 4, "fc.fc": 36 * 5 - 5}
    assert conn.ratio == pytest.approx((30 + 224 + 175) / (1536 + 768 + 180))
    # the structural pass restores the masks' modes
    assert all(m.mode == "soft" for m in net.modules() if hasattr(m, "mode"))


class HandSEW(SpikingNet):
    """1 channel, 3x3 map, 1x1 kernels: stem -> SEW block (conv1, conv2, identity) -> after."""

    def __init__(self):
        super().__init__()
        self.T, self.num_classes, self.input_shape = 1, 9, (1, 3, 3)
        self.stem = StaticConvBNSpike(1, 1, 1, 1, 0, neuron="if", weight_mask=False, T=1)
        self.block = _SEWBlock([ConvBNSpike(1, 1, 1, 1, 0, "if"), ConvBNSpike(1, 1, 1, 1, 0, "if")], None)
        self.after = ConvBNSpike(1, 1, 1, 1, 0, "if")
        self.finalize()

    def forward(self, x):
        return self.after(self.block(self.stem(x))).flatten(2)

    def consumers(self):
        return []


def test_sew_connectivity_counts_shortcut_multiplicities():
    """The block's output map is conv2's 0/1 map + the shortcut's: 2 where both live, and that
    value weights `after`'s count (the reference's connects())."""
    net = HandSEW()
    conn = connectivity(net)
    # dense: stem 9, conv1 9, conv2 9, after 2 x 9 (every position reached twice)
    assert conn.dense == {"stem.conv": 9, "block.convs.0.conv": 9, "block.convs.1.conv": 9, "after.conv": 18}
    with torch.no_grad():
        for p in mask_logits(net):
            p.fill_(1.0)
        net.block.convs[0].nmask.logits[0, 0, 0] = -1.0  # conv1 drops its neuron at (0, 0)
        net.block.convs[1].nmask.logits[0, 1, 1] = -1.0  # conv2 drops its neuron at (1, 1)
    conn = connectivity(net)
    # conv1 8; conv2 sees a dead (0, 0) and keeps 7 of the other 8; block map: 1 at (0, 0) and
    # (1, 1) (shortcut only), 2 at the other 7 -> after 2 + 14
    assert conn.live == {"stem.conv": 9, "block.convs.0.conv": 8, "block.convs.1.conv": 7, "after.conv": 16}
    assert conn.ratio == pytest.approx(40 / 45)


class HandAvgPool(SpikingNet):
    """1 channel, 4x4 map: stem 1x1 -> conv 1x1 (neuron mask) -> 2x2 average pool -> FC 4 -> 2."""

    def __init__(self):
        super().__init__()
        self.T, self.num_classes, self.input_shape = 1, 2, (1, 4, 4)
        self.stem = StaticConvBNSpike(1, 1, 1, 1, 0, T=1)
        self.conv = ConvBNSpike(1, 1, 1, 1, 0)
        self.pool = SeqPool("avg", 2)
        self.fc = LinearSpike(4, 2, neuron=None)
        self.finalize()

    def forward(self, x):
        return self.fc(self.pool(self.conv(self.stem(x))).flatten(2))

    def consumers(self):
        return sequential_consumers([self.conv, self.fc])


def test_avg_pool_connectivity_weights_by_the_pooled_fraction():
    net = HandAvgPool()
    assert connectivity(net).dense == {"stem.conv": 16, "conv.conv": 16, "fc.fc": 8}
    with torch.no_grad():
        for p in mask_logits(net):
            p.fill_(1.0)
        net.conv.nmask.logits[0, 0, :2] = -1.0  # two of the top-left pooling window's 4 neurons
        net.fc.fc.logits[0, 0] = -1.0  # output 0 no longer reads the top-left window
    conn = connectivity(net)
    # pooled map [0.5, 1, 1, 1]: output 0 reads 3 of it, output 1 all 3.5 (OR would give 4 + 3)
    assert conn.live == {"stem.conv": 16, "conv.conv": 14, "fc.fc": 3 + 3.5}
    assert conn.ratio == pytest.approx(36.5 / 40)


def tiny_sew(depth: int):
    return build_model(f"sew_resnet{depth}", width=1 / 16, input_size=32, T=2)


def test_sew_fanout_through_identity_shortcuts():
    """SEW-18 at width 1/16: stage 1 has 4 channels, stage 2 has 8 (first conv 3x3/2,
    downsample 1x1/2). Block 0's output reaches block 1's first conv, then, through block 1's
    identity, block 2's first conv and downsample, and stops there."""
    net = tiny_sew(18)
    b = list(net.blocks)
    e_n = {id(m): e for m, e in penalty_terms(net).neurons}
    stage2 = 8 * 9 / 4 + 8 * 1 / 4
    assert e_n[id(b[0].convs[0].nmask)] == 4 * 9  # into block 0's own second conv
    assert e_n[id(b[0].convs[1].nmask)] == 4 * 9 + stage2
    assert e_n[id(b[1].convs[1].nmask)] == stage2
    # a downsampling block's output (both of its maps): block 3's first conv, then block 4's
    # first conv 3x3/2 and downsample 1x1/2 (stage 3: 16 channels)
    stage3 = 16 * 9 / 4 + 16 * 1 / 4
    assert e_n[id(b[2].convs[1].nmask)] == e_n[id(b[2].downsample.nmask)] == 8 * 9 + stage3


def test_sew50_fanout_through_bottlenecks():
    """SEW-50 at width 1/16: stage 1 planes 4 (outputs 16), stage 2 planes 8 with the stride
    on the 3x3. Block 0's output feeds the 1x1 convs of blocks 1 and 2 (4 outputs each), then
    block 3's 1x1 (8 outputs, stride 1) and its downsample 1x1/2 (32 outputs / 4)."""
    net = tiny_sew(50)
    b = list(net.blocks)
    e_n = {id(m): e for m, e in penalty_terms(net).neurons}
    assert e_n[id(b[0].convs[2].nmask)] == e_n[id(b[0].downsample.nmask)] == 4 + 4 + 8 + 32 / 4
    assert e_n[id(b[0].convs[1].nmask)] == 16  # 1x1 conv to 16 channels
    assert e_n[id(b[3].convs[0].nmask)] == 8 * 9 / 4  # into the strided 3x3


def test_beta_schedule():
    K = 1000
    assert beta_at(0, K) == 5.0
    assert beta_at(K, K) == pytest.approx(1000.0)
    assert beta_at(K // 2, K) == pytest.approx(math.sqrt(5.0 * 1000.0))
    assert beta_at(2 * K, K) == pytest.approx(1000.0)


def _random_logits(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.randn(p.shape, generator=g))


def test_hard_masks_zero_what_they_remove():
    torch.manual_seed(0)
    net = TwoConvNet()
    _random_logits(net)
    harden(net)
    net.eval()
    x = 3 * torch.randn(4, 2, 6, 6)
    out = net(x)
    out.square().sum().backward()
    layers = [net.conv1.conv, net.conv2.conv, net.fc.fc]
    for layer in layers:
        removed = layer.logits <= 0
        assert removed.any() and (~removed).any()
        assert layer.weight.grad is not None
        assert torch.all(layer.weight.grad[removed] == 0)
        assert layer.logits.grad is None
    # removed neurons pass on nothing
    spikes = net.conv1(x.unsqueeze(0).repeat(2, 1, 1, 1, 1))
    assert torch.all(spikes[:, :, net.conv1.nmask.logits <= 0] == 0)
    # changing removed weights changes nothing
    with torch.no_grad():
        for layer in layers:
            layer.weight[layer.logits <= 0] += 100 * torch.randn(int((layer.logits <= 0).sum()))
        assert torch.equal(net(x), out)


def test_penalty_gradients_reach_only_logits():
    net = TwoConvNet()
    _random_logits(net)
    for m in net.modules():
        if hasattr(m, "beta"):
            m.beta = 5.0
    energy_penalty(net, lambda_w=1e-3, lambda_n=1e-3).backward()
    assert all(p.grad is None for p in weight_params(net))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask_logits(net))


def test_penalty_value_by_hand():
    """At logits 0 every gate is 1/2: P = 1/2 (lambda_w sum_w + lambda_n sum_n)."""
    net = TwoConvNet()
    sums = penalty_terms(net).sums()
    p = energy_penalty(net, lambda_w=2e-3, lambda_n=1e-3)
    assert p.item() == pytest.approx(0.5 * (2e-3 * sums["weights"] + 1e-3 * sums["neurons"]))


@pytest.mark.parametrize("name", ["cifar10_6conv2fc", "sew_resnet18"])
def test_ablations(name):
    kw = dict(width=1 / 32, input_size=8) if name.startswith("cifar") else dict(width=1 / 16, input_size=32)
    weights_only = build_model(name, neuron_masks=False, **kw)
    neurons_only = build_model(name, weight_masks=False, **kw)
    assert not any(isinstance(m, NeuronMask) and m.logits is not None for m in weights_only.modules())
    assert any(isinstance(m, MaskedConv2d) and m.logits is not None for m in weights_only.modules())
    assert not any(isinstance(m, (MaskedConv2d, MaskedLinear)) and m.logits is not None
                   for m in neurons_only.modules())
    assert any(isinstance(m, NeuronMask) and m.logits is not None for m in neurons_only.modules())
    assert penalty_terms(weights_only).neurons == [] and penalty_terms(neurons_only).weights == []
    for net in (weights_only, neurons_only):
        p = energy_penalty(net, 1e-3, 1e-3)
        p.backward()
        assert p.item() > 0
        assert all(q.grad is None for q in weight_params(net))


def test_mode_off_is_dense():
    net = TwoConvNet()
    with torch.no_grad():
        for p in mask_logits(net):
            p.fill_(-1.0)
    set_mask_mode(net, "off")
    assert all(m.keep().all() for m in net.modules() if isinstance(m, (MaskedConv2d, MaskedLinear)))
    conn = connectivity(net)  # always with hard masks: everything removed
    assert conn.live_total == 0 and conn.ratio == 0
