"""spikeprune's scientific core: spiking networks, masks, the energy penalty and report."""

from model.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
