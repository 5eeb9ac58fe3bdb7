"""ATan surrogate spike function (docs/METHOD.md §1), numerically the same as SpikingJelly's
`surrogate.ATan(alpha=2.)`: forward is the Heaviside step (spike iff x >= 0), backward
uses dS/dx = alpha / (2 (1 + (pi/2 alpha x)^2))."""
import math

import torch

ALPHA = 2.0


def atan_grad(x: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Surrogate derivative dS/dx at x = V - V_th, same shape and dtype as x.

    Written in SpikingJelly's operation order so float64 / float32 results agree bit for bit."""
    a = alpha / 2
    ax = math.pi * a * x
    return a / (1 + ax * ax)


class ATanSpike(torch.autograd.Function):
    """S = H(x) forward, ATan surrogate backward; x is any shape, S has x's shape and dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_spike * atan_grad(x, ctx.alpha), None


def atan_spike(x: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Spikes (0/1, x's dtype) of x = V - V_th with the ATan surrogate gradient."""
    return ATanSpike.apply(x, alpha)
