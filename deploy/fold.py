"""BatchNorm folded into the conv before it, with the hard weight mask applied: the one
weight/bias pair both the event engine and the NIR export ship (docs/DEPLOY.md)."""

from __future__ import annotations

import numpy as np

from model.layers import ConvBNSpike


def fold_conv_bn(block: ConvBNSpike) -> tuple[np.ndarray, np.ndarray]:
    """(weight [Co, Ci, kh, kw], bias [Co]) in float64 of the masked conv followed by the
    eval-mode BatchNorm: w * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps)."""
    conv, bn = block.conv, block.bn
    w = conv.weight.detach().cpu().double().numpy() * conv.keep().cpu().numpy()
    mean = bn.running_mean.detach().cpu().double().numpy()
    var = bn.running_var.detach().cpu().double().numpy()
    gamma = bn.weight.detach().cpu().double().numpy() if bn.affine else np.ones_like(mean)
    beta = bn.bias.detach().cpu().double().numpy() if bn.affine else np.zeros_like(mean)
    a = gamma / np.sqrt(var + bn.eps)
    return w * a[:, None, None, None], beta - mean * a
