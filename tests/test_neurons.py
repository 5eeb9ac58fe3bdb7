"""Neuron dynamics against SpikingJelly 2.0.0 (the reference, test-only): spikes equal,
input gradients within 1e-6, for LIF and IF, float64 and float32, conv and FC shapes; and
the properties of our neurons alone, which run (and must pass) without SpikingJelly."""
from __future__ import annotations

import pytest
import torch

from model import neurons_triton
from model.neurons import MultiStepIF, MultiStepLIF
from model.surrogate import atan_spike


# "wide" has more neurons than one CPU task takes (model.neurons.CHUNK), the last block partial.
SHAPES = {"conv": (8, 4, 3, 6, 5), "fc": (8, 6, 40), "wide": (4, 3, 30001)}


def spikingjelly():
    """SpikingJelly's neuron and surrogate modules; only the comparisons skip without them."""
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron",
                                 reason="SpikingJelly is the test-only reference: bash install.sh --test")
    from spikingjelly.activation_based import surrogate

    return neuron, surrogate


def ours(kind: str, detach_reset: bool = True, decay_input: bool = True, v_reset: float = 0.0):
    common = dict(v_threshold=1.0, v_reset=v_reset, detach_reset=detach_reset)
    if kind == "lif":
        return MultiStepLIF(tau=2.0, decay_input=decay_input, **common)
    return MultiStepIF(**common)


def make_pair(kind: str, detach_reset: bool = True, decay_input: bool = True, v_reset: float = 0.0):
    """(ours, SpikingJelly's) neuron with the same settings (multi-step, ATan alpha = 2)."""
    sj_neuron, sj_surrogate = spikingjelly()
    common = dict(v_threshold=1.0, v_reset=v_reset, detach_reset=detach_reset,
                  surrogate_function=sj_surrogate.ATan(alpha=2.0), step_mode="m")
    if kind == "lif":
        theirs = sj_neuron.LIFNode(tau=2.0, decay_input=decay_input, **common)
    else:
        theirs = sj_neuron.IFNode(**common)
    return ours(kind, detach_reset, decay_input, v_reset), theirs


def run(node, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(spikes, dL/dx) of one forward + backward with upstream gradient grad_out."""
    if type(node).__module__.startswith("spikingjelly"):
        node.reset()  # SpikingJelly keeps V between calls; ours starts at v_reset every call
    x = x.detach().clone().requires_grad_()
    spikes = node(x)
    (grad_x,) = torch.autograd.grad(spikes, x, grad_out)
    return spikes.detach(), grad_x


def inputs(shape, dtype, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input currents around threshold (a fair share of spikes) and a random upstream grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.6
    return x, torch.randn(shape, generator=g, dtype=dtype)


def assert_matches_reference(ours, ref, x, grad_out):
    s_ours, g_ours = run(ours, x, grad_out)
    s_ref, g_ref = run(ref, x, grad_out)
    assert s_ours.dtype == x.dtype and s_ours.shape == x.shape
    assert 0.05 < s_ours.mean().item() < 0.6  # the comparison is not vacuous
    assert torch.equal(s_ours, s_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)


def test_atan_surrogate_matches_spikingjelly():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    x[300] = 0.0
    x.requires_grad_()
    ours = atan_spike(x)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = spikingjelly()[1].ATan(alpha=2.0)(x_ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    assert torch.equal(ours, ref) and ours[300].item() == 1.0  # H(0) = 1
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["lif", "if"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("detach_reset", [True, False])
def test_matches_spikingjelly(kind, dtype, shape, detach_reset):
    x, grad_out = inputs(shape, dtype)
    assert_matches_reference(*make_pair(kind, detach_reset), x, grad_out)


@pytest.mark.parametrize("kind", ["lif", "if"])
def test_detach_reset_changes_gradients(kind):
    x, grad_out = inputs(SHAPES["conv"], torch.float64)
    _, g_detached = run(ours(kind, detach_reset=True), x, grad_out)
    _, g_attached = run(ours(kind, detach_reset=False), x, grad_out)
    assert (g_detached - g_attached).abs().max() > 1e-2


def test_lif_without_decay_input_and_nonzero_reset_match_spikingjelly():
    x, grad_out = inputs(SHAPES["fc"], torch.float64)
    assert_matches_reference(*make_pair("lif", decay_input=False), x, grad_out)
    for kind in ("lif", "if"):
        assert_matches_reference(*make_pair(kind, detach_reset=False, v_reset=-0.3), x, grad_out)


@pytest.mark.parametrize("node", [MultiStepLIF(), MultiStepIF()], ids=["lif", "if"])
def test_no_state_between_calls(node):
    x, grad_out = inputs(SHAPES["conv"], torch.float32)
    other, _ = inputs(SHAPES["fc"], torch.float32, seed=1)
    first = run(node, x, grad_out)
    node(other * 3)  # another batch, another shape in between
    second = run(node, x, grad_out)
    fresh = run(type(node)(), x, grad_out)
    for a, b, c in zip(first, second, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_potential_starts_at_reset_every_call():
    """Each call ends with a charged potential that would fire on the next call's first
    step if it were carried over: IF 0.6, 1.2 (fire), 0.6; LIF 0.6, 0.9 (then 1.05)."""
    lif, if_ = MultiStepLIF(), MultiStepIF()
    for _ in range(3):
        assert if_(torch.full((3, 1), 0.6)).flatten().tolist() == [0.0, 1.0, 0.0]
        assert lif(torch.full((2, 1), 1.2)).flatten().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_half_precision_follows_float32(kind, dtype):
    """16-bit inputs integrate in float32: same spikes as float32 on the same values;
    gradients to 16-bit precision (H is stored in the input dtype)."""
    x, grad_out = inputs(SHAPES["conv"], torch.float32)
    x, grad_out = x.to(dtype), grad_out.to(dtype)
    node = ours(kind)
    s_half, g_half = run(node, x, grad_out)
    s_full, g_full = run(node, x.float(), grad_out.float())
    assert s_half.dtype == dtype and g_half.dtype == dtype
    assert torch.equal(s_half.float(), s_full)
    torch.testing.assert_close(g_half.float(), g_full, rtol=0.05, atol=0.02)


def test_no_grad_and_non_contiguous_inputs():
    x, grad_out = inputs((5, 4, 8, 3), torch.float32)
    node = MultiStepLIF()
    spikes, grad_x = run(node, x, grad_out)
    with torch.no_grad():
        assert torch.equal(node(x), spikes)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not x_t.is_contiguous()
    spikes_t, grad_x_t = run(node, x_t, grad_out)
    assert torch.equal(spikes_t, spikes) and torch.equal(grad_x_t, grad_x)


def test_second_backward_on_one_forward_is_refused():
    """Backward writes dL/dX over the saved potential, so a retained graph cannot be reused."""
    x = torch.randn(4, 3, requires_grad=True)
    spikes = MultiStepLIF()(x)
    spikes.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        spikes.sum().backward()


@pytest.mark.skipif(not (torch.cuda.is_available() and neurons_triton.AVAILABLE),
                    reason="needs CUDA and triton")
@pytest.mark.parametrize("kind", ["lif", "if"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_triton_matches_cpu(kind, dtype, detach_reset):
    x, grad_out = inputs((8, 16, 3000), torch.float32)
    x, grad_out = x.to(dtype), grad_out.to(dtype)
    node = ours(kind, detach_reset)
    s_cpu, g_cpu = run(node, x, grad_out)
    s_gpu, g_gpu = run(node, x.cuda(), grad_out.cuda())
    assert torch.equal(s_gpu.cpu(), s_cpu)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=tol, atol=tol)
