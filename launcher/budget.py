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
That brings the search near the budget; landing on it is the job of `calibrate`: at hardening
and after every fine-tuning epoch, one common shift of the logits, found by a search over the
ranks of the logits on the calibration batches (the first validation batches: SOPs need no
labels), puts the hard-mask SOPs in [(1 - tolerance) budget, budget] (launcher.train then
re-estimates BatchNorm's running statistics if the kept set moved, and calibrates again). The
rule "kept iff alpha > 0" stays true after the shift, so every report and saved mask reads it
unchanged.
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

        The kept set changes only where tau crosses a logit, so the search runs over the ranks
        of the distinct logits and ends when the bracket holds no logit. Each step interpolates
        log SOPs linearly in rank (a first step with one measured end assumes SOPs proportional
        to the kept masks); a step that does not halve the bracket makes the next a bisection.
        The demo's 8 calibrations took 66-90 search steps where bisection on tau took 138 (each
        a forward pass over every calibration batch; docs/METHOD.md §4 has the runs); a first
        measurement already in the band costs none. SOPs are not quite monotone in tau (a
        re-added weight can silence a neuron downstream) and jump where many logits sit together
        (demo: a shift of -1.3e-6 took them from 3.1e4 to 6.1e4, and validation top-1 from 0.56
        to 0.25), so the band may be stepped over: the answer is then the measured tau closest
        under the budget (closest above only if nothing measured is under it, e.g. a budget
        below what no mask removes). Called at hardening and after every fine-tuning epoch,
        because fine-tuning moves the firing rates (and with them the SOPs) of a fixed
        subnetwork: every checkpoint the run may select has been measured on the budget right
        before its validation."""
        logits = mask_logits(net)
        original = [p.detach().clone() for p in logits]
        flat = torch.sort(torch.cat([p.flatten() for p in original]).float()).values
        values = torch.unique_consecutive(flat)  # ascending; rank j keeps alpha > values[j]
        now = int(torch.searchsorted(values, torch.zeros(()), right=True)) - 1  # tau 0's rank
        measured: dict[int, dict[str, float]] = {}

        def tau_of(j: int) -> float:
            return 0.0 if j == now else float(values[j]) if j >= 0 else float(values[0]) - 1.0

        def sops_at(j: int) -> float:
            tau = tau_of(j)
            for p, p0 in zip(logits, original):
                p.copy_(p0 - tau)
            measured[j] = self.measure(net, batches)
            return measured[j]["cost"]

        def kept(j: int) -> int:
            return flat.numel() if j < 0 else flat.numel() - int(torch.searchsorted(flat, values[j], right=True))

        def miss(s: float) -> tuple[bool, float]:  # a budget is a cap: any SOPs under it beat any over
            return s > self.budget, abs(math.log(max(s, 1e-9) / self.budget))

        def fits(s: float) -> bool:
            return (1.0 - self.tolerance) * self.budget <= s <= self.budget

        def guess(lo: int, hi: int) -> int:
            aim = math.log((1.0 - self.tolerance / 2) * self.budget)
            s_lo, s_hi = measured[lo]["cost"], measured.get(hi, {}).get("cost", 0.0)
            if s_hi > 0 and s_lo > s_hi:
                f = (math.log(s_lo) - aim) / (math.log(s_lo) - math.log(s_hi))
                return round(lo + f * (hi - lo))
            want = max(1, round(kept(lo) * math.exp(aim) / max(s_lo, 1e-9)))
            tau = flat[max(0, flat.numel() - want - 1)]  # kept iff alpha > tau keeps ~want masks
            return int(torch.searchsorted(values, tau))

        before, iters = sops_at(now), 0
        best, inside = now, fits(before)
        if not fits(before):
            # lo keeps more (over budget), hi keeps fewer; rank len(values) - 1 keeps nothing.
            lo, hi = (now, len(values) - 1) if before > self.budget else (-1, now)
            if before < self.budget:  # the budget may lie above the whole network: keep it all
                iters, everything = 1, sops_at(-1)
                best = -1 if miss(everything) < miss(before) else best
                if everything < self.budget:
                    max_iters = 0
            bisect = False
            while iters < max_iters and hi - lo > 1:
                iters += 1
                j = (lo + hi) // 2 if bisect else min(hi - 1, max(lo + 1, guess(lo, hi)))
                s = sops_at(j)
                if fits(s):  # in the band wins over a closer miss just above the budget
                    best, inside = j, True
                    break
                if miss(s) < miss(measured[best]["cost"]):
                    best = j
                width = hi - lo
                lo, hi = (j, hi) if s > self.budget else (lo, j)
                bisect = 2 * (hi - lo) > width
        tau, after = tau_of(best), measured[best]["cost"]
        overwrite_params(logits, [p0 - tau for p0 in original])
        self.last_sops = after
        found = {"budget_tau": tau, "budget_sops_before": measured[now]["sops"],
                 "budget_sops_after": measured[best]["sops"], "budget_calibration_iters": float(iters),
                 "budget_in_band": float(inside)}
        if self.energy_model is not None:
            found.update(budget_energy_pj_before=before, budget_energy_pj_after=after)
        return found

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "last_sops": self.last_sops, "start_sops": self.start_sops}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])
        self.last_sops = state.get("last_sops")
        self.start_sops = state.get("start_sops")
