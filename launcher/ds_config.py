"""The DeepSpeed engine's configuration (ds_config), derived from our config.

No "optimizer" or "scheduler" section: the client optimizer is launcher/optimizer.py and the
learning rates are set by the loop (model/schedules.py), so there is no FusedAdam JIT build.
"""

from __future__ import annotations

from typing import Literal

from launcher.config import Config


def resolve_precision(precision: str, on_gpu: bool) -> Literal["fp32", "bf16"]:
    """'auto' -> bf16 on GPU, fp32 on CPU (the config has already refused anything else)."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision  # type: ignore[return-value]


def build_ds_config(cfg: Config, world_size: int, on_gpu: bool) -> dict:
    """The ds_config dict for `deepspeed.initialize(config=...)`, derived from our config.

    No "optimizer" or "scheduler" section: the client optimizer comes from `build_optimizer`
    and learning rates are set by the loop (`set_lr`), so no FusedAdam JIT build either.
    """
    micro = cfg.data.batch_size
    accum = cfg.optim.grad_accum
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(cfg.deepspeed.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "checkpoint": {"tag_validation": "Fail"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
