"""Budget mode (method.md §4, "we go beyond"): one run that lands on a SOP budget.

Instead of a hand-picked lambda, the search adapts lambda_w and lambda_n (same factor, so
their configured ratio is kept) by dual ascent in log space on the *measured* SOPs per
sample of the current hard masks:

    log lambda <- log lambda + lr * clip(log(S / budget), -1, 1)

every `every` optimizer steps, S measured on the current training batch (one extra forward
with hard masks, no grad). At the end of the search the logits get one common shift, found by
bisection on a few calibration batches, so that the hardened subnetwork's SOPs sit on the
budget; the rule "kept iff alpha > 0" stays true after the shift.
"""

from __future__ import annotations

import math

import torch

from launcher.distributed import reduce_scalars
from model.energy import measure_energy
from model.masks import mask_logits


def _sops(net, batches) -> float:
    """SOPs per sample of the hard masks, averaged over ranks so every rank decides alike."""
    return reduce_scalars({"sops": measure_energy(net, batches).sops_per_sample})["sops"]


class BudgetController:
    def __init__(self, budget: float, lambda_w: float, lambda_n: float, every: int = 10, lr: float = 0.2):
        if budget <= 0:
            raise ValueError(f"pruning.sop_budget must be > 0, got {budget}")
        self.budget, self.every, self.lr = float(budget), every, lr
        # A zero lambda would stay zero in log space: start both from the larger one's scale.
        base = max(lambda_w, lambda_n, 1e-12)
        self.log_scale = 0.0
        self.lambda_w0 = lambda_w if lambda_w > 0 else base
        self.lambda_n0 = lambda_n if lambda_n > 0 else base
        self.last_sops: float | None = None

    def lambdas(self) -> tuple[float, float]:
        s = math.exp(self.log_scale)
        return self.lambda_w0 * s, self.lambda_n0 * s

    def observe(self, net, x: torch.Tensor) -> float:
        """Measure SOPs of the current hard masks on batch `x` and take one dual step."""
        sops = _sops(net, [(x,)])
        self.last_sops = sops
        ratio = max(sops, 1e-9) / self.budget
        self.log_scale += self.lr * max(-1.0, min(1.0, math.log(ratio)))
        return sops

    @torch.no_grad()
    def calibrate(self, net, batches: list, iters: int = 20) -> dict[str, float]:
        """Shift every logit by -tau so that hard-mask SOPs on `batches` ~ budget."""
        logits = mask_logits(net)
        original = [p.detach().clone() for p in logits]

        def sops_at(tau: float) -> float:
            for p, p0 in zip(logits, original):
                p.copy_(p0 - tau)
            return _sops(net, batches)

        before = sops_at(0.0)
        lo, hi = 0.0, 0.0
        if before > self.budget:  # too many SOPs: raise the threshold
            hi = max(float(torch.cat([p.flatten() for p in original]).max()), 0.0) + 1e-6
        else:  # under budget: lower it (keep more), down to keeping every logit
            lo = min(float(torch.cat([p.flatten() for p in original]).min()), 0.0) - 1e-6
        for _ in range(iters):
            mid = (lo + hi) / 2
            if sops_at(mid) > self.budget:
                lo = mid
            else:
                hi = mid
        tau = hi  # the smallest shift found that keeps SOPs within the budget
        after = sops_at(tau)
        self.last_sops = after
        return {"budget_tau": tau, "budget_sops_before": before, "budget_sops_after": after}

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "last_sops": self.last_sops}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])
        self.last_sops = state.get("last_sops")
