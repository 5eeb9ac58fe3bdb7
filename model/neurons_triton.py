"""Triton kernels for the multi-step LIF / IF time loop on CUDA (see model.neurons).

One program owns BLOCK neurons and walks all T steps, keeping the potential in registers:
forward reads X[t] once and writes S[t] and H[t] once; backward reads dL/dS[t] and H[t]
and writes dL/dX[t] over H[t] in place. Arithmetic is float32 for float32 / float16 /
bfloat16 tensors (DTYPES); other dtypes take the scripted loop. Without triton installed,
AVAILABLE is False and nothing here is used.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024

if AVAILABLE:

    @triton.jit
    def _forward_kernel(x_ptr, spike_ptr, h_ptr, T, M, tau, u_th, h_below, h_above,
                        CHARGE: tl.constexpr, STORE_H: tl.constexpr, LOW: tl.constexpr,
                        BLOCK: tl.constexpr):
        """x, spike, h: [T, M] contiguous. CHARGE as model.neurons.CHARGE_*; LOW: the
        storage dtype is 16-bit, so H is clamped to keep H >= u_th equal to the spike."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        u = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(T):
            idx = tl.cast(t, tl.int64) * M + offs
            x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if CHARGE == 0:
                h = u + x
            elif CHARGE == 1:
                h = tl.math.div_rn(x - u, tau) + u
            else:
                h = u - tl.math.div_rn(u, tau) + x
            fired = h >= u_th
            spike = tl.where(fired, 1.0, 0.0)
            tl.store(spike_ptr + idx, spike.to(spike_ptr.dtype.element_ty), mask=mask)
            if STORE_H:
                if LOW:
                    # Rounding is monotonic: clamped away from u_th, H rounds to the same side.
                    h_c = tl.where(fired, tl.maximum(h, h_above), tl.minimum(h, h_below))
                    tl.store(h_ptr + idx, h_c.to(h_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(h_ptr + idx, h, mask=mask)
            u = tl.where(fired, 0.0, h)

    @triton.jit
    def _backward_kernel(gs_ptr, h_ptr, T, M, dh_dx, dh_du, u_th, a, c,
                         DETACH_RESET: tl.constexpr, BLOCK: tl.constexpr):
        """gs, h: [T, M] contiguous; dL/dX[t] overwrites H[t] (same formula as the scripted
        model.neurons._backward_chunk)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        nxt = tl.zeros([BLOCK], dtype=tl.float32)  # dL/dX[t+1]
        for i in range(T):
            idx = tl.cast(T - 1 - i, tl.int64) * M + offs
            h = tl.load(h_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            gs = tl.load(gs_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            d = h - u_th
            if not DETACH_RESET:
                gs = gs - (dh_du / dh_dx) * nxt * h
            sg = tl.math.div_rn(a, 1.0 + c * d * d)
            gx = dh_dx * (gs * sg) + dh_du * tl.where(d >= 0, 0.0, nxt)
            tl.store(h_ptr + idx, gx.to(h_ptr.dtype.element_ty), mask=mask)
            nxt = gx


def forward(x2: torch.Tensor, charge: int, tau: float, u_th: float, h_below: float,
            h_above: float, store_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [T, M] contiguous CUDA, dtype in DTYPES -> (spike2 [T, M], h2 [T, M] or empty)."""
    T, M = x2.shape
    spike2 = torch.empty_like(x2)
    h2 = torch.empty_like(x2) if store_h else x2.new_empty(0)
    if M == 0:
        return spike2, h2
    grid = (triton.cdiv(M, BLOCK),)
    # Triton launches on the current device, which need not be x2's.
    with torch.cuda.device(x2.device):
        # Without STORE_H the kernel never touches h_ptr; x2 stands in for a valid pointer.
        _forward_kernel[grid](x2, spike2, h2 if store_h else x2, T, M, tau, u_th, h_below,
                              h_above, CHARGE=charge, STORE_H=store_h,
                              LOW=x2.dtype != torch.float32, BLOCK=BLOCK)
    return spike2, h2


def backward(g2: torch.Tensor, h2: torch.Tensor, dh_dx: float, dh_du: float, u_th: float,
             alpha: float, detach_reset: bool) -> torch.Tensor:
    """g2 = dL/dS, h2 = H, both [T, M] contiguous CUDA -> dL/dX [T, M], written over h2."""
    T, M = h2.shape
    a = alpha / 2
    c = (torch.pi * a) ** 2
    if M == 0:
        return h2
    grid = (triton.cdiv(M, BLOCK),)
    with torch.cuda.device(h2.device):
        _backward_kernel[grid](g2, h2, T, M, dh_dx, dh_du, u_th, a, c,
                               DETACH_RESET=detach_reset, BLOCK=BLOCK)
    return h2
