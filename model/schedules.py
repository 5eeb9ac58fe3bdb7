"""The two schedules of a run, both pure functions of the optimizer step (so a resume needs
only the step): the mask temperature beta (docs/METHOD.md §3) and the learning rate."""

from __future__ import annotations

import math
from typing import Literal


def beta_at(step: int, total_steps: int, beta_0: float = 5.0, beta_T: float = 1000.0) -> float:
    """Mask temperature at optimizer step `step` of `total_steps`: beta_0 (beta_T/beta_0)^(k/K)."""
    if total_steps <= 0:
        return beta_T
    frac = min(max(step / total_steps, 0.0), 1.0)
    return beta_0 * (beta_T / beta_0) ** frac


def lr_at(step: int, total_steps: int, base_lr: float, schedule: Literal["none", "cosine"]) -> float:
    """LR after `step` of `total_steps` optimizer steps: constant, or cosine decay to 0."""
    if schedule == "none" or total_steps <= 0:
        return base_lr
    frac = min(max(step / total_steps, 0.0), 1.0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * frac))
