"""Budget mode (docs/METHOD.md §4, "we go beyond"): one run that lands on a SOP budget, or on an
energy budget in pJ per sample under a named hardware model (docs/ENERGY.md). Below, "SOPs"
stands for whichever of the two is budgeted: the controller measures that one.

Instead of a hand-picked lambda, the search adapts lambda_w and lambda_n (same factor, so
their configured ratio is kept) by dual ascent in log space on the *measured* SOPs per
sample of the current hard masks:

    log lambda <- log lambda + lr * clip(log(S / target(progress)), -1, 1)

every `every` optimizer steps, S measured on the current training batch (one extra forward
with hard masks, no grad). The target descends geometrically from the dense network's SOPs
(measured at the first observation) to the budget over the first `ramp` of the search, then
stays on the budget. With the budget as the target from the first step, lambda wound up 1000x
while the masks, moving at most the mask LR per step under Adam, were still far above it, and
then the whole network fell silent at once (demo recipe, 4e4 budget: every logit negative by
step 190 of 600, and at beta in the hundreds a dead mask receives no gradient to come back).
That brings the search near the budget; landing on it is the job
of `calibrate`: at hardening and after every fine-tuning epoch, one common shift of the logits,
found by bisection on the calibration batches (the first validation batches: SOPs need no
labels), puts the hard-mask SOPs in [(1 - tolerance) budget, budget]. The rule "kept iff
alpha > 0" stays true after the shift, so every report and saved mask reads it unchanged.
"""

from __future__ import annotations

import math

import torch

from launcher.distributed import reduce_scalars
from launcher.optimizer import overwrite_params
from model.energy_count import measure_energy
from model.energy_models import energy_model as named_model
from model.masks import mask_logits


class BudgetController:
    """`energy_model` None: the budget is SOPs per sample; a model's name (model/energy_models.py):
    the budget is pJ per sample under that model."""

    def __init__(self, budget: float, lambda_w: float, lambda_n: float, every: int = 10, lr: float = 0.5,
                 tolerance: float = 0.05, ramp: float = 0.6, energy_model: str | None = None):
        key = "pruning.sop_budget" if energy_model is None else "pruning.energy_budget_pj"
        if budget <= 0:
            raise ValueError(f"{key} must be > 0, got {budget}")
        if energy_model is not None:
            named_model(energy_model)  # an unknown name fails here, not at the first measurement
        self.energy_model = energy_model
        self.budget, self.every, self.lr, self.tolerance = float(budget), every, lr, tolerance
        self.ramp = ramp
        self.start_sops: float | None = None  # the dense network's, measured at the first observation
        # A zero lambda would stay zero in log space: start both from the larger one's scale.
        base = max(lambda_w, lambda_n, 1e-12)
        self.log_scale = 0.0
        self.lambda_w0 = lambda_w if lambda_w > 0 else base
        self.lambda_n0 = lambda_n if lambda_n > 0 else base
        self.last_sops: float | None = None

    def measure(self, net, batches) -> dict[str, float]:
        """SOPs (and, with an energy model, pJ) per sample of the hard masks, averaged over
        ranks so every rank decides alike; "cost" is the budgeted one."""
        report = measure_energy(net, batches)
        out = {"sops": report.sops_per_sample}
        if self.energy_model is not None:
            out["energy_pj"] = report.model_energy_pj(self.energy_model)
        out = reduce_scalars(out)
        return {**out, "cost": out.get("energy_pj", out["sops"])}

    @torch.no_grad()
    def _dense_cost(self, net, batches) -> float:
        """The budgeted cost of the same network with every mask kept (the logits restored after)."""
        logits = mask_logits(net)
        saved = [p.detach().clone() for p in logits]
        try:
            for p in logits:
                p.fill_(1.0)
            return self.measure(net, batches)["cost"]
        finally:
            for p, p0 in zip(logits, saved):
                p.copy_(p0)

    def lambdas(self) -> tuple[float, float]:
        s = math.exp(self.log_scale)
        return self.lambda_w0 * s, self.lambda_n0 * s

    def target(self, progress: float) -> float:
        """The SOPs per sample aimed at after `progress` (0..1) of the search."""
        if self.start_sops is None or self.start_sops <= self.budget:
            return self.budget
        f = min(1.0, max(progress, 0.0) / self.ramp) if self.ramp > 0 else 1.0
        return self.start_sops * (self.budget / self.start_sops) ** f

    def observe(self, net, x: torch.Tensor, progress: float = 1.0) -> float:
        """Measure SOPs of the current hard masks on batch `x` and take one dual step towards
        `target(progress)`.

        The step is large (lr 0.5: up to e^0.5 x per observation) because Adam normalises each
        logit's step: lambda's scale moves the masks only where the task gradient competes
        with the penalty. On the demo, lr 0.2 left the SOPs where a fixed lambda put them;
        lr 1 overshot (2e5 budget: the search ended at 9e4) and lost 2 points of accuracy."""
        if self.start_sops is None:
            self.start_sops = self._dense_cost(net, [(x,)])
        sops = self.measure(net, [(x,)])["cost"]
        self.last_sops = sops
        self.log_scale += self.lr * max(-1.0, min(1.0, math.log(max(sops, 1e-9) / self.target(progress))))
        return sops

    @torch.no_grad()
    def calibrate(self, net, batches: list, max_iters: int = 30) -> dict[str, float]:
        """Shift every logit by one common -tau (kept iff alpha > tau) so that the hard-mask
        SOPs per sample on `batches` land in [(1 - tolerance) budget, budget].

        Bisection on tau; a measurement already in the band costs no search. SOPs are not
        quite monotone in tau (a re-added weight can silence a neuron downstream) and jump
        where one mask feeds many synapses, so the band may be stepped over: the answer is
        then the measured tau closest to the budget (above or below). Called at hardening and after every
        fine-tuning epoch, because fine-tuning moves the firing rates (and with them the
        SOPs) of a fixed subnetwork: every checkpoint the run may select has been measured on
        the budget right before its validation."""
        logits = mask_logits(net)
        original = [p.detach().clone() for p in logits]
        measured: dict[float, dict[str, float]] = {}

        def sops_at(tau: float) -> float:
            for p, p0 in zip(logits, original):
                p.copy_(p0 - tau)
            measured[tau] = self.measure(net, batches)
            return measured[tau]["cost"]

        def miss(s: float) -> float:
            return abs(math.log(max(s, 1e-9) / self.budget))

        def fits(s: float) -> bool:
            return (1.0 - self.tolerance) * self.budget <= s <= self.budget

        before = sops_at(0.0)
        best, iters = (0.0, before), 0
        if not fits(before):
            flat = torch.cat([p.flatten() for p in original])
            # lo keeps more (over budget), hi keeps fewer.
            lo, hi = (0.0, float(flat.max()) + 1e-6) if before > self.budget else (float(flat.min()) - 1e-6, 0.0)
            if before < self.budget:  # the budget may lie above the whole network: keep it all
                iters, everything = 1, sops_at(lo)
                best = (lo, everything) if miss(everything) < miss(before) else best
                if everything < self.budget:
                    max_iters = 0
            while iters < max_iters:
                iters += 1
                mid = (lo + hi) / 2
                s = sops_at(mid)
                if fits(s):  # in the band wins over a closer miss just above the budget
                    best = (mid, s)
                    break
                if miss(s) < miss(best[1]):
                    best = (mid, s)
                lo, hi = (mid, hi) if s > self.budget else (lo, mid)
        tau, after = best
        overwrite_params(logits, [p0 - tau for p0 in original])
        self.last_sops = after
        found = {"budget_tau": tau, "budget_sops_before": measured[0.0]["sops"],
                 "budget_sops_after": measured[tau]["sops"], "budget_calibration_iters": float(iters)}
        if self.energy_model is not None:
            found.update(budget_energy_pj_before=before, budget_energy_pj_after=after)
        return found

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "last_sops": self.last_sops, "start_sops": self.start_sops}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])
        self.last_sops = state.get("last_sops")
        self.start_sops = state.get("start_sops")
