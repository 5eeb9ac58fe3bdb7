"""The client optimiser for masks + weights that DeepSpeed drives, and its LR / freeze controls.

Why one optimizer object with two roles, not two optimizers or two engines
--------------------------------------------------------------------------
The method (docs/METHOD.md §3) needs two optimisers: Adam for the mask logits and Adam or SGD for
the weights (+ BatchNorm), each at its own learning rate, the logits stepped first.
DeepSpeed drives exactly one client optimizer per engine, and two engines whose losses flow
through each other break in stage-dependent ways (docs/STACK.md). ZeRO stages 1 and 2 need a
`torch.optim.Optimizer` exposing `param_groups`: they flatten every param group into one
fp32 partition per rank, put that flat tensor into `group["params"]` in place, and call the
client's `step()` once per optimizer step after the gradients are reduced.

`MaskWeightOptimizer` is that one optimizer. Its param groups carry a `"role"` key ("mask" or
"weight") and a `"frozen"` key. `step()` runs the mask groups through a `torch.optim.Adam`
and then the weight groups through `torch.optim.Adam` / `torch.optim.SGD`: the inner
optimizers hold no state of their own; before every step they are pointed at the current
group dicts and at the shared `state`, so whatever DeepSpeed did to the groups (flattening,
`load_state_dict` replacing them on resume) is what they update. Consequences:
- separate LRs and hyper-parameters: per group, kept through ZeRO flattening and
  checkpoints (`set_lr(opt, "weight", lr)` resets the fine-tune LR, state kept);
- logits first: the order inside `step()`; under ZeRO 1/2 each rank does it on its own
  partition of both groups, then DeepSpeed all-gathers. (Both updates use gradients of the
  same backward pass and disjoint parameters, so the order does not change the numbers; it is
  kept because the method states it.)
- hardening: `freeze(opt, "mask")` skips the mask groups. This matters under ZeRO, which
  feeds zero-filled gradients for parameters that received none, and Adam would keep moving
  the frozen logits on its momentum.
ZeRO only "supports" optimizers of exact listed types, so the ds_config sets
`zero_allow_untested_optimizer`; tests check stage 1/2 against stage 0.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

from launcher.config import Config

Role = Literal["mask", "weight"]
ROLES: tuple[Role, ...] = ("mask", "weight")  # step order


class MaskWeightOptimizer(torch.optim.Optimizer):
    """Adam for mask-logit groups, then Adam or SGD for weight groups, in one optimizer."""

    def __init__(self, mask_params: Iterable[torch.nn.Parameter],
                 weight_params: Iterable[torch.nn.Parameter], *,
                 mask_lr: float, lr: float, weight_optimizer: Literal["adam", "sgd"] = "adam",
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0):
        mask_params, weight_params = list(mask_params), list(weight_params)
        if not weight_params:
            raise ValueError("MaskWeightOptimizer needs at least one weight parameter")
        self._inner: dict[str, torch.optim.Optimizer] = {}
        if mask_params:
            self._inner["mask"] = torch.optim.Adam(mask_params, lr=mask_lr)
        if weight_optimizer == "adam":
            self._inner["weight"] = torch.optim.Adam(weight_params, lr=lr, weight_decay=weight_decay)
        elif weight_optimizer == "sgd":
            self._inner["weight"] = torch.optim.SGD(
                weight_params, lr=lr, momentum=momentum, nesterov=nesterov,
                weight_decay=weight_decay)
        else:
            raise ValueError(f"unknown weight optimizer {weight_optimizer!r}")
        groups = []
        for role, inner in self._inner.items():
            for group in inner.param_groups:
                group["role"] = role
                group["frozen"] = False
                group["algorithm"] = type(inner).__name__.lower()
                groups.append(group)
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for role in ROLES:
            inner = self._inner.get(role)
            groups = [g for g in self.param_groups if g["role"] == role and not g["frozen"]]
            if inner is None or not groups:
                continue
            # Re-point every step: DeepSpeed replaces group params and load_state_dict
            # replaces the groups and the state; this object's view is the true one.
            inner.param_groups = groups
            inner.state = self.state
            inner.step()
        return loss


def build_optimizer(mask_params: Iterable[torch.nn.Parameter],
                    weight_params: Iterable[torch.nn.Parameter], cfg: Config) -> MaskWeightOptimizer:
    """The client optimizer for `deepspeed.initialize(optimizer=...)` (see module docstring).

    Pass the same parameter lists in every phase and on resume (hardening must not remove
    the logits from the engine), or ZeRO's flat partitions no longer match the checkpoint.
    """
    o = cfg.optim
    return MaskWeightOptimizer(mask_params, weight_params, mask_lr=o.mask_lr, lr=o.lr,
                               weight_optimizer=o.weight_optimizer, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)


def _groups(optimizer: torch.optim.Optimizer, role: Role) -> list[dict]:
    # engine.optimizer (a ZeRO/bf16 wrapper) and our optimizer both expose the same dicts.
    groups = [g for g in optimizer.param_groups if g.get("role") == role]
    if not groups:
        raise ValueError(f"optimizer has no {role!r} param group")
    return groups


def set_lr(optimizer: torch.optim.Optimizer, role: Role, lr: float) -> None:
    for g in _groups(optimizer, role):
        g["lr"] = lr


def get_lr(optimizer: torch.optim.Optimizer, role: Role) -> float:
    return float(_groups(optimizer, role)[0]["lr"])


def freeze(optimizer: torch.optim.Optimizer, role: Role) -> None:
    """Stop updating `role`'s parameters (hardened masks); survives checkpoints."""
    for g in _groups(optimizer, role):
        g["frozen"] = True


def overwrite_params(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    """Write `values` into `params` so that the write survives the next optimizer step.

    ZeRO 1/2 and DeepSpeed's bf16 optimizer step their own fp32 copies and copy them back over
    the module's parameters, so an in-place edit of the module alone (budget calibration
    shifting frozen logits) would be undone one step later. Every rank passes the same values."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
            safe_set_full_fp32_param(p, v.to(torch.float32))  # no-op without a master copy
