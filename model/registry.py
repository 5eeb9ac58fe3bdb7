"""Networks by name, so configs, the CLI and sweeps name a topology with one string."""

from __future__ import annotations

from functools import partial

from model.base import SpikingNet
from model.cifar_net import Cifar6Conv2FC
from model.sew_resnet import SEWResNet
from model.vgg_dvs import VGGSNN

MODELS = {
    "cifar10_6conv2fc": Cifar6Conv2FC,
    "vggsnn_dvs": VGGSNN,
    "sew_resnet18": partial(SEWResNet, 18),
    "sew_resnet34": partial(SEWResNet, 34),
    "sew_resnet50": partial(SEWResNet, 50),
}


def build_model(name: str, *, num_classes: int = 10, T: int | None = None, width: float = 1.0,
                input_size: int | None = None, weight_masks: bool = True,
                neuron_masks: bool = True) -> SpikingNet:
    """Build a network by name; T and input_size default to the paper's for that network."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    kw = dict(num_classes=num_classes, width=width, weight_masks=weight_masks, neuron_masks=neuron_masks)
    if T is not None:
        kw["T"] = T
    if input_size is not None:
        kw["input_size"] = input_size
    return MODELS[name](**kw)
