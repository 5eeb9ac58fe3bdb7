"""Plots of the masks for MLflow: where the logits ended up, per layer."""

from __future__ import annotations

import os

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model.atomic import atomic_write
from model.masks import NeuronMask, masked_modules


def mask_histogram_png(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Histograms of the weight and neuron logits (kept iff > 0), one panel per kind. Counted
    with numpy and drawn as one outline per panel (not a patch per bin), on a bare Figure (no
    pyplot state): every run writes this twice, so it stays cheap."""
    kinds = {"weight logits": [], "neuron logits": []}
    for _, m in masked_modules(net):
        if m.logits is not None:
            key = "neuron logits" if isinstance(m, NeuronMask) else "weight logits"
            kinds[key].append(m.logits.detach().float().flatten().cpu())
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, parts) in zip(fig.subplots(1, 2), kinds.items()):
        if parts:
            values = torch.cat(parts)
            kept = float((values > 0).float().mean()) * 100
            counts, edges = np.histogram(values.clamp(-0.2, 0.2).numpy(), bins=80, range=(-0.2, 0.2))
            ax.stairs(counts, edges, fill=True, color="tab:blue")
            ax.set_ylim(0.5, 2.0 * max(1, counts.max()))  # log axis: empty bins at the bottom, a bin of 1 shows
            ax.axvline(0, color="tab:red", lw=1)
            ax.set_title(f"{title}: {kept:.2f}% kept (> 0)")
        else:
            ax.set_title(f"{title}: none (ablation)")
        ax.set_yscale("log")
        ax.set_xlabel("logit (clipped to +-0.2)")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
