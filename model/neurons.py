"""Multi-step LIF and IF neurons (docs/METHOD.md §1) with a hand-written BPTT.

Input x_seq is [T, N, ...]; output spikes have its shape and dtype. The membrane potential
starts at v_reset on every call, so no state survives between batches (no reset_net).

The time loop runs as one autograd node: forward and backward are torch.jit.script loops on
CPU (in-place ops into preallocated buffers; blocks of neurons run as parallel tasks, each
through all T steps) and Triton kernels on CUDA (model.neurons_triton). Backward needs only
the charged potential H[t] (saved in the input dtype); spikes and the reset mask are
recomputed from it, and dL/dX is written over it.

Internally the potential is shifted, U = V - v_reset, so the reset is always to 0 and the
threshold is v_threshold - v_reset; with v_reset = 0 (the method's value) every operation
is the one SpikingJelly performs, in the same order, so spikes agree bit for bit.
"""
import math
import warnings

import torch
from torch import nn

from model import neurons_triton
from model.surrogate import ALPHA

# Charge rules, U = V - v_reset:  IF: H = U + X;  LIF: H = U + (X - U) / tau;
# LIF without decay_input: H = U - U / tau + X.
CHARGE_IF, CHARGE_LIF, CHARGE_LIF_NO_DECAY_INPUT = 0, 1, 2

# Neurons per CPU task: a task's buffers stay in L2 across the T steps, and at this size
# (ATen's grain size) each op runs serially, so the tasks, not OpenMP, share the cores.
CHUNK = 1 << 15


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are integrated in float32; float32 / float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _use_triton(x2: torch.Tensor) -> bool:
    return x2.is_cuda and neurons_triton.AVAILABLE and x2.dtype in neurons_triton.DTYPES


def _chunk(x2: torch.Tensor) -> int:
    """Neurons per task for x2 [T, M]: cache-sized on CPU; on other devices (CUDA without
    triton, float64) one block, so ops stay on the caller's thread and stream."""
    return CHUNK if x2.device.type == "cpu" else max(x2.shape[1], 1)


def _below_above(u_th: float, dtype: torch.dtype) -> tuple[float, float]:
    """(largest value < u_th, smallest value >= u_th) representable in dtype; clamping a
    stored H to them keeps `H >= u_th` (the recomputed spike) true to the forward's spike."""
    th = torch.tensor(u_th, dtype=torch.float64)
    above = th.to(dtype)
    if above.double() < th:
        above = torch.nextafter(above, torch.tensor(math.inf, dtype=dtype))
    below = torch.nextafter(above, torch.tensor(-math.inf, dtype=dtype))
    return below.item(), above.item()


def _forward_chunk(x_seq: torch.Tensor, spike_seq: torch.Tensor, h_seq: torch.Tensor,
                   charge: int, tau: float, u_th: float, h_below: float, h_above: float,
                   store_h: bool):
    """One block of neurons through all T steps: x_seq [T, m] -> spike_seq, h_seq [T, m]
    (written in place; h_seq only if store_h). The potential U stays in a [m] buffer."""
    T, m = x_seq.shape[0], x_seq.shape[1]
    cdt = torch.float32 if x_seq.dtype in (torch.float16, torch.bfloat16) else x_seq.dtype
    low = cdt != x_seq.dtype
    u = torch.zeros(m, dtype=cdt, device=x_seq.device)
    h_buf = torch.empty(m, dtype=cdt, device=x_seq.device)
    spike = torch.empty(m, dtype=cdt, device=x_seq.device)
    for t in range(T):
        x = x_seq[t]
        if low:
            x = x.to(cdt)
        h = h_seq[t] if store_h and not low else h_buf
        if charge == 0:
            torch.add(u, x, out=h)
        elif charge == 1:
            torch.sub(x, u, out=h)
            h.div_(tau)
            h.add_(u)
        else:
            torch.div(u, tau, out=h)
            torch.sub(u, h, out=h)
            h.add_(x)
        if not low:
            spike = spike_seq[t]
        torch.ge(h, u_th, out=spike)
        # Hard reset to 0: U = H - H * S is exactly H (S = 0) or exactly 0 (S = 1).
        torch.addcmul(h, h, spike, value=-1.0, out=u)
        if low:
            spike_seq[t].copy_(spike)
            if store_h:
                # Rounding is monotonic: clamped away from u_th, H rounds to the same side.
                h_seq[t].copy_(torch.where(spike > 0, h.clamp_min(h_above),
                                           h.clamp_max(h_below)))


def _forward_loop(x_seq: torch.Tensor, charge: int, tau: float, u_th: float,
                  h_below: float, h_above: float, store_h: bool, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_seq [T, M] contiguous -> (spike_seq [T, M], h_seq [T, M] or empty), x_seq's dtype.

    h_seq holds the charged (pre-reset) shifted potential H[t], only if store_h. Blocks of
    `chunk` neurons run as independent tasks on the inter-op thread pool."""
    x_seq = x_seq.detach()
    spike_seq = torch.empty_like(x_seq)
    h_seq = torch.empty_like(x_seq) if store_h else x_seq.new_empty(0)
    M = x_seq.shape[1]
    if M <= chunk:  # one block (or a CUDA tensor without triton): no task to hand out
        _forward_chunk(x_seq, spike_seq, h_seq, charge, tau, u_th, h_below, h_above, store_h)
        return spike_seq, h_seq
    tasks = [torch.jit.fork(_forward_chunk, x_seq[:, c0:c0 + chunk], spike_seq[:, c0:c0 + chunk],
                            h_seq[:, c0:c0 + chunk] if store_h else h_seq,
                            charge, tau, u_th, h_below, h_above, store_h)
             for c0 in range(0, M, chunk)]
    for task in tasks:
        torch.jit.wait(task)
    return spike_seq, h_seq


def _backward_chunk(grad_spike: torch.Tensor, h_seq: torch.Tensor, dh_dx: float, dh_du: float,
                    u_th: float, alpha: float, detach_reset: bool):
    """BPTT for one block of neurons: grad_spike, h_seq [T, m] -> dL/dX written over h_seq.

    With S = step(H - u_th), sg = a / (1 + c (H - u_th)^2) (ATan', a = alpha / 2,
    c = (pi a)^2) and U[t] = H[t] (1 - S[t]):
      dL/dH[t] = dL/dS[t] sg + dL/dU[t] dU/dH,  dU/dH = 1 - S  [- H sg without detach_reset]
      dL/dU[t] = dL/dH[t+1] dh_du,  dL/dX[t] = dL/dH[t] dh_dx,
    so dL/dX[t] = dh_dx a dL/dS[t] / (1 + c (H - u_th)^2) + dh_du (1 - S[t]) dL/dX[t+1]
    (plus the reset's path): five elementwise passes per step, all float (torch.where and
    masked_fill_ with a bool mask are several times slower than a float multiply on CPU).
    Each H[t] is read before its slot receives dL/dX[t].
    """
    T, m = h_seq.shape[0], h_seq.shape[1]
    cdt = torch.float32 if h_seq.dtype in (torch.float16, torch.bfloat16) else h_seq.dtype
    low = cdt != h_seq.dtype
    dev = h_seq.device
    a = alpha / 2
    c = (math.pi * a) ** 2
    k_s = dh_dx * a
    # addcmul(1 / k_s, d, d, c / k_s) then gs / that = k_s gs / (1 + c d^2) in two passes.
    inv_k_s = torch.full((), 1.0 / k_s, dtype=cdt, device=dev)
    nxt = torch.zeros(m, dtype=cdt, device=dev)  # dL/dX[t+1]
    not_fired = torch.empty(m, dtype=cdt, device=dev)  # 1 - S[t]
    d = torch.empty(m, dtype=cdt, device=dev)
    gx_buf = torch.empty(m, dtype=cdt, device=dev)
    for t in range(T - 1, -1, -1):
        h = h_seq[t]
        gs = grad_spike[t]
        if low:
            h = h.to(cdt)
            gs = gs.to(cdt)
        if not detach_reset:
            # The reset's path through S: sg (-H dL/dU[t]), dL/dU[t] = dh_du / dh_dx dL/dX[t+1].
            gs = torch.addcmul(gs, nxt, h, value=-dh_du / dh_dx)
        torch.sub(h, u_th, out=d)
        torch.lt(d, 0.0, out=not_fired)
        torch.addcmul(inv_k_s, d, d, value=c / k_s, out=d)
        torch.div(gs, d, out=d)
        gx = gx_buf if low else h_seq[t]
        torch.addcmul(d, nxt, not_fired, value=dh_du, out=gx)
        if low:
            h_seq[t].copy_(gx)
        nxt = gx


def _backward_loop(grad_spike: torch.Tensor, h_seq: torch.Tensor, dh_dx: float, dh_du: float,
                   u_th: float, alpha: float, detach_reset: bool, chunk: int) -> torch.Tensor:
    """BPTT through the recurrence. grad_spike, h_seq [T, M] contiguous -> grad_x [T, M],
    in blocks of `chunk` neurons on the inter-op thread pool (see _backward_chunk).

    grad_x is written over h_seq: a fresh [T, M] buffer would cost as much in page faults
    as the whole loop costs in arithmetic."""
    grad_spike, h_seq = grad_spike.detach(), h_seq.detach()
    M = h_seq.shape[1]
    if M <= chunk:
        _backward_chunk(grad_spike, h_seq, dh_dx, dh_du, u_th, alpha, detach_reset)
        return h_seq
    tasks = [torch.jit.fork(_backward_chunk, grad_spike[:, c0:c0 + chunk], h_seq[:, c0:c0 + chunk],
                            dh_dx, dh_du, u_th, alpha, detach_reset)
             for c0 in range(0, M, chunk)]
    for task in tasks:
        torch.jit.wait(task)
    return h_seq


def _slopes(charge: int, tau: float) -> tuple[float, float]:
    """(dH/dX, dH/dU) of the charge rule."""
    if charge == CHARGE_IF:
        return 1.0, 1.0
    if charge == CHARGE_LIF:
        return 1.0 / tau, 1.0 - 1.0 / tau
    return 1.0, 1.0 - 1.0 / tau


def _script(fn):
    # torch.jit.script is deprecated in favour of torch.compile, but needs no C++ toolchain
    # at run time and removes the per-step Python overhead, which is all we want here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*",
                                category=DeprecationWarning)
        return torch.jit.script(fn)


_forward_loop_cpu = _script(_forward_loop)
_backward_loop_cpu = _script(_backward_loop)


class _MultiStepSpiking(torch.autograd.Function):
    """x_seq [T, ...] -> spike_seq [T, ...]; one autograd node for the whole time loop."""

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, charge: int, tau: float, u_th: float,
                detach_reset: bool, store_h: bool) -> torch.Tensor:
        T = x_seq.shape[0]
        x2 = x_seq.contiguous().view(T, -1)
        below, above = (_below_above(u_th, x2.dtype) if _compute_dtype(x2.dtype) != x2.dtype
                        else (u_th, u_th))
        if _use_triton(x2):
            spike2, h2 = neurons_triton.forward(x2, charge, tau, u_th, below, above, store_h)
        else:
            spike2, h2 = _forward_loop_cpu(x2, charge, tau, u_th, below, above, store_h,
                                           _chunk(x2))
        if store_h:
            ctx.save_for_backward(h2)
        ctx.params = (charge, tau, u_th, detach_reset)
        return spike2.view(x_seq.shape)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        try:
            (h2,) = ctx.saved_tensors
        except RuntimeError as err:
            raise RuntimeError("a spiking neuron's backward ran twice on one forward "
                               "(retain_graph): its saved potential already holds the "
                               "first gradient; run the forward again") from err
        charge, tau, u_th, detach_reset = ctx.params
        dh_dx, dh_du = _slopes(charge, tau)
        g2 = grad_spike.contiguous().view(h2.shape).to(h2.dtype)
        if _use_triton(h2):
            grad_x = neurons_triton.backward(g2, h2, dh_dx, dh_du, u_th, ALPHA, detach_reset)
        else:
            grad_x = _backward_loop_cpu(g2, h2, dh_dx, dh_du, u_th, ALPHA, detach_reset,
                                        _chunk(h2))
        return grad_x.view(grad_spike.shape), None, None, None, None, None


def _multi_step(x_seq: torch.Tensor, charge: int, tau: float, u_th: float,
                detach_reset: bool) -> torch.Tensor:
    """x_seq [T, ...] -> spikes [T, ...]; H is kept for backward only when a graph is built
    (ctx.needs_input_grad stays True under torch.no_grad, so it is decided here)."""
    store_h = torch.is_grad_enabled() and x_seq.requires_grad
    return _MultiStepSpiking.apply(x_seq, charge, tau, u_th, detach_reset, store_h)


class MultiStepLIF(nn.Module):
    """Leaky integrate-and-fire over [T, N, ...]: H = V + (X - (V - V_reset)) / tau
    (decay_input) or H = V - (V - V_reset) / tau + X; S = H >= v_threshold; hard reset
    V = V_reset where S. ATan surrogate (alpha = 2); detach_reset drops the reset's path."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: float = 0.0,
                 detach_reset: bool = True, decay_input: bool = True):
        super().__init__()
        if not tau > 1.0:
            raise ValueError(f"tau must be > 1, got {tau}")
        self.tau, self.v_threshold, self.v_reset = float(tau), float(v_threshold), float(v_reset)
        self.detach_reset, self.decay_input = detach_reset, decay_input

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """x_seq [T, N, ...] float -> spikes [T, N, ...] (0/1, x_seq's dtype)."""
        charge = CHARGE_LIF if self.decay_input else CHARGE_LIF_NO_DECAY_INPUT
        return _multi_step(x_seq, charge, self.tau, self.v_threshold - self.v_reset,
                           self.detach_reset)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
                f"detach_reset={self.detach_reset}, decay_input={self.decay_input}")


class MultiStepIF(nn.Module):
    """Integrate-and-fire over [T, N, ...]: H = V + X, S = H >= v_threshold, hard reset to
    V_reset. ATan surrogate (alpha = 2); detach_reset drops the reset's path."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float = 0.0, detach_reset: bool = True):
        super().__init__()
        self.v_threshold, self.v_reset = float(v_threshold), float(v_reset)
        self.detach_reset = detach_reset

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """x_seq [T, N, ...] float -> spikes [T, N, ...] (0/1, x_seq's dtype)."""
        return _multi_step(x_seq, CHARGE_IF, 0.0, self.v_threshold - self.v_reset,
                           self.detach_reset)

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
                f"detach_reset={self.detach_reset}")
