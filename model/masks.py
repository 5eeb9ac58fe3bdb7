"""Learnable weight and neuron masks (docs/METHOD.md §3).

Every mask is a logit tensor alpha, initialised at 0. Three modes:
- "soft": gate = sigmoid(beta * alpha) (search phase; gradients reach alpha),
- "hard": gate = (alpha > 0) (subnetwork; alpha frozen, removed entries get no gradient),
- "off":  gate = 1 (dense evaluation of the same network, used for the dense reference).
beta is a plain float pushed into every masked module by `set_beta`; it is a pure function
of the optimizer step (`model.schedules.beta_at`), so resuming needs only the step.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.atomic import atomic_write

MODES = ("soft", "hard", "off")


class MaskError(ValueError):
    """A mask file or mask operation that does not fit the network."""


class _Gate(nn.Module):
    """Shared logic of a mask: the logit tensor, the mode and beta."""

    def _init_gate(self, shape: tuple[int, ...] | None) -> None:
        self.mode = "soft"
        self.beta = 5.0
        self.logits = nn.Parameter(torch.zeros(shape)) if shape is not None else None

    @property
    def has_mask(self) -> bool:
        return self.logits is not None

    def gate(self) -> torch.Tensor | None:
        """The multiplicative mask for the current mode, or None when there is nothing to gate."""
        if self.logits is None or self.mode == "off":
            return None
        if self.mode == "hard":
            return (self.logits.detach() > 0).to(self.logits.dtype)
        return torch.sigmoid(self.beta * self.logits)

    def keep(self) -> torch.Tensor:
        """Boolean map of what survives structurally (mode-aware: all kept when off/no mask)."""
        raise NotImplementedError


class MaskedConv2d(nn.Conv2d, _Gate):
    """Bias-free conv whose weight is gated elementwise by a learnable mask.

    `counted` marks layers whose synaptic operations enter the SOP count (all but the
    first layer / stem); `in_hw`/`out_hw` are filled by the network's structural pass.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 weight_mask: bool = True, counted: bool = True):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                           padding=padding, bias=False)
        self._init_gate(tuple(self.weight.shape) if weight_mask else None)
        self.counted = counted
        self.in_hw: tuple[int, int] | None = None
        self.out_hw: tuple[int, int] | None = None

    def masked_weight(self) -> torch.Tensor:
        g = self.gate()
        return self.weight if g is None else self.weight * g

    def keep(self) -> torch.Tensor:
        if self.logits is None or self.mode == "off":
            return torch.ones_like(self.weight, dtype=torch.bool)
        return self.logits.detach() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), None)


class MaskedLinear(nn.Linear, _Gate):
    """Linear layer with an elementwise weight mask (see MaskedConv2d); bias only for the SEW head."""

    def __init__(self, in_features, out_features, weight_mask: bool = True, counted: bool = True,
                 bias: bool = False):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_gate(tuple(self.weight.shape) if weight_mask else None)
        self.counted = counted
        self.in_hw = (1, 1)
        self.out_hw = (1, 1)

    def masked_weight(self) -> torch.Tensor:
        g = self.gate()
        return self.weight if g is None else self.weight * g

    def keep(self) -> torch.Tensor:
        if self.logits is None or self.mode == "off":
            return torch.ones_like(self.weight, dtype=torch.bool)
        return self.logits.detach() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class NeuronMask(_Gate):
    """Gates the outgoing spikes of one spiking layer; one logit per neuron [C, H, W].

    The neuron integrates and fires as usual; only what it passes on is gated. The shape is
    only known once the layer's output size is, so the logits are created lazily by
    `materialize` during the network's structural pass.
    """

    def __init__(self, enabled: bool = True):
        super().__init__()
        self._init_gate(None)
        self.enabled = enabled
        self.shape: tuple[int, ...] | None = None

    def materialize(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        if self.enabled and self.logits is None:
            self.logits = nn.Parameter(torch.zeros(self.shape))

    def keep(self) -> torch.Tensor:
        if self.logits is None or self.mode == "off":
            return torch.ones(self.shape, dtype=torch.bool)
        return self.logits.detach() > 0

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        g = self.gate()
        return spikes if g is None else spikes * g


def masked_modules(net: nn.Module) -> Iterator[tuple[str, _Gate]]:
    for name, m in net.named_modules():
        if isinstance(m, _Gate):
            yield name, m


def weight_layers(net: nn.Module) -> list[tuple[str, MaskedConv2d | MaskedLinear]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]


def set_beta(net: nn.Module, beta: float) -> None:
    for _, m in masked_modules(net):
        m.beta = float(beta)


def set_mask_mode(net: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise MaskError(f"mask mode must be one of {MODES}, got {mode!r}")
    for _, m in masked_modules(net):
        m.mode = mode


@contextmanager
def mask_mode(net: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run a block with every mask in `mode`; each mask's own mode is restored after, so a
    function that switches modes for its own work leaves the network as it found it."""
    modes = {name: m.mode for name, m in masked_modules(net)}
    set_mask_mode(net, mode)
    try:
        yield net
    finally:
        for name, m in masked_modules(net):
            m.mode = modes[name]


def harden(net: nn.Module) -> None:
    """Turn the search result into the subnetwork: hard masks, logits frozen."""
    set_mask_mode(net, "hard")
    for p in mask_logits(net):
        p.requires_grad_(False)


def mask_logits(net: nn.Module) -> list[nn.Parameter]:
    return [m.logits for _, m in masked_modules(net) if m.logits is not None]


def weight_params(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not a mask logit (weights and BatchNorm affine terms)."""
    ids = {id(p) for p in mask_logits(net)}
    return [p for p in net.parameters() if id(p) not in ids]


def keep_ratios(net: nn.Module) -> tuple[float, float]:
    """(weight_keep, neuron_keep): fraction of logits > 0 over masked weights / neurons."""
    w_keep = w_all = n_keep = n_all = 0
    for _, m in masked_modules(net):
        if m.logits is None:
            continue
        k = int((m.logits.detach() > 0).sum())
        if isinstance(m, NeuronMask):
            n_keep, n_all = n_keep + k, n_all + m.logits.numel()
        else:
            w_keep, w_all = w_keep + k, w_all + m.logits.numel()
    return (w_keep / w_all if w_all else 1.0, n_keep / n_all if n_all else 1.0)


def save_masks(net: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Write the hard masks (alpha > 0) bit-packed into a zip of .npy arrays, atomically.

    Shipping a subnetwork needs only these bits and the weights: 1 bit per weight.
    """
    atomic_write(path, lambda f: _write_mask_zip(f, net, model_name))


def _write_mask_zip(f, net: nn.Module, model_name: str) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model_name", model_name)
        for name, m in masked_modules(net):
            if m.logits is None:
                continue
            bits = np.packbits((m.logits.detach().cpu() > 0).numpy().reshape(-1))
            buf = io.BytesIO()
            np.save(buf, bits, allow_pickle=False)
            zf.writestr(f"{name}.bits.npy", buf.getvalue())
            zf.writestr(f"{name}.shape", ",".join(map(str, m.logits.shape)))


def load_masks(net: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Load a mask file into `net`'s logits (+1 kept, -1 removed) and harden the net."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise MaskError(f"{path}: not a spikeprune mask file ({e})") from None
    with zf:
        names = set(zf.namelist())
        saved_model = zf.read("model_name").decode() if "model_name" in names else "?"
        if saved_model != model_name:
            raise MaskError(f"{path}: masks are for model {saved_model!r}, not {model_name!r}")
        mods = {n: m for n, m in masked_modules(net) if m.logits is not None}
        saved = {n[: -len(".bits.npy")] for n in names if n.endswith(".bits.npy")}
        if saved != set(mods):
            missing, extra = sorted(set(mods) - saved), sorted(saved - set(mods))
            raise MaskError(f"{path}: mask layers do not match the network "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, m in mods.items():
            shape = tuple(int(s) for s in zf.read(f"{name}.shape").decode().split(","))
            if shape != tuple(m.logits.shape):
                raise MaskError(f"{path}: mask {name} has shape {shape}, the network "
                                f"needs {tuple(m.logits.shape)} (different width?)")
            bits = np.load(io.BytesIO(zf.read(f"{name}.bits.npy")), allow_pickle=False)
            flat = np.unpackbits(bits)[: math.prod(shape)].astype(np.float32)
            with torch.no_grad():
                m.logits.copy_(torch.from_numpy(flat * 2 - 1).reshape(shape))
    harden(net)
