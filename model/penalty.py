"""The decomposed energy penalty (docs/METHOD.md §4).

    P = lambda_n * sum_l e_n(l) * sum_i sigmoid(beta alpha_n,i)
      + lambda_w * sum_l e_w(l) * sum_p sigmoid(beta alpha_w,p)

e_w(l): output positions one kernel entry serves (H_in W_in / stride^2; 1 for FC).
e_n(l): the dense fan-out of one neuron, C_out k_h k_w / stride^2 summed over its consumers.
Both are structural and computed once; only the logits receive gradients from P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from model.masks import MaskedConv2d, MaskedLinear, NeuronMask, weight_layers


@dataclass
class PenaltyTerms:
    weights: list[tuple[MaskedConv2d | MaskedLinear, float]]
    neurons: list[tuple[NeuronMask, float]]

    def sums(self) -> dict[str, float]:
        """sum_l e(l) * (#logits in l): the penalty's scale at all-kept, per kind."""
        return {"weights": sum(e * m.logits.numel() for m, e in self.weights),
                "neurons": sum(e * m.logits.numel() for m, e in self.neurons)}


def weight_coefficient(layer: MaskedConv2d | MaskedLinear) -> float:
    if isinstance(layer, MaskedLinear):
        return 1.0
    h, w = layer.in_hw
    s_h, s_w = layer.stride
    return h * w / (s_h * s_w)


def fanout_coefficient(layer: MaskedConv2d | MaskedLinear) -> float:
    """Dense outgoing synapses of one presynaptic neuron into `layer` (pooling ignored)."""
    if isinstance(layer, MaskedLinear):
        return float(layer.out_features)
    k_h, k_w = layer.kernel_size
    s_h, s_w = layer.stride
    return layer.out_channels * k_h * k_w / (s_h * s_w)


def penalty_terms(net: nn.Module, firing_rates: dict[int, float] | None = None) -> PenaltyTerms:
    """Coefficients of every masked layer; `firing_rates` (id(neuron mask) -> rate) optionally
    scales e_n by measured activity, so that silent neurons cost less than busy ones."""
    weights = [(m, weight_coefficient(m)) for _, m in weight_layers(net) if m.logits is not None]
    neurons = []
    for nmask, consumers in net.consumers():
        e_n = sum(fanout_coefficient(c) for c in consumers)
        if firing_rates is not None:
            e_n *= firing_rates.get(id(nmask), 1.0)
        neurons.append((nmask, e_n))
    return PenaltyTerms(weights, neurons)


def energy_penalty(net: nn.Module, lambda_w: float, lambda_n: float,
                   terms: PenaltyTerms | None = None) -> torch.Tensor:
    """The search-phase penalty; pass precomputed `terms` to skip the structural look-up."""
    terms = terms or penalty_terms(net)
    total = torch.zeros(())
    if lambda_w:
        for m, e in terms.weights:
            total = total + lambda_w * e * torch.sigmoid(m.beta * m.logits).sum()
    if lambda_n:
        for m, e in terms.neurons:
            total = total + lambda_n * e * torch.sigmoid(m.beta * m.logits).sum()
    return total
