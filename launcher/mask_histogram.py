"""Plots of the masks for MLflow: where the logits ended up, per layer."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model.atomic import atomic_write  # noqa: E402
from model.masks import NeuronMask, masked_modules  # noqa: E402


def mask_histogram_png(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Histograms of the weight and neuron logits (kept iff > 0), one panel per kind."""
    kinds = {"weight logits": [], "neuron logits": []}
    for _, m in masked_modules(net):
        if m.logits is not None:
            key = "neuron logits" if isinstance(m, NeuronMask) else "weight logits"
            kinds[key].append(m.logits.detach().float().flatten().cpu())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (title, parts) in zip(axes, kinds.items()):
        if parts:
            values = torch.cat(parts)
            kept = float((values > 0).float().mean()) * 100
            ax.hist(values.clamp(-0.2, 0.2).numpy(), bins=80, color="tab:blue")
            ax.axvline(0, color="tab:red", lw=1)
            ax.set_title(f"{title}: {kept:.2f}% kept (> 0)")
        else:
            ax.set_title(f"{title}: none (ablation)")
        ax.set_yscale("log")
        ax.set_xlabel("logit (clipped to +-0.2)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
