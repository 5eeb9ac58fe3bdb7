"""One-command check of the GPU paths: neuron kernels, training throughput, bf16 decisions, energy count.

    .venv/bin/python benchmarks/gpu_check.py [--budget-s 100] [--out FILE] [--engine auto]
    .venv/bin/python benchmarks/gpu_check.py --smoke      # the same code at tiny sizes on the CPU

Checks (each one a row group in the table, a key in the JSON line, and a time budget):
1. neuron_kernels: the Triton LIF/IF forward + backward (model.neurons on CUDA) against the
   scripted CPU loop on the same inputs (spikes identical; dL/dX within 1e-6 max(1, |ref|) in
   fp32, one bf16 rounding step in bf16), SpikingJelly's neurons (its torch implementation) for
   agreement, and time per forward + backward call of both.
2. train_step: search-phase steps of full-width SEW-ResNet-18 (224 x 224, T = 4, soft masks,
   energy penalty, MaskWeightOptimizer) on synthetic inputs already on the device: images/s and
   peak memory at batch 32 and 64, fp32 and bf16, through our DeepSpeed engine (ZeRO 1, world
   size 1) when deepspeed imports, else plain PyTorch (same optimizer and loss, autocast bf16).
3. bf16_decisions: the same seed and data through N search steps in fp32 and in bf16: the
   fraction of mask decisions (logit > 0) that differ, and each run's hard-mask SOPs.
4. energy_count: measure_energy of the same weights, masks and batch on the CPU and on the GPU,
   per-layer SOPs compared exactly (float64 on both devices, where the forward is device
   independent, and float32, where a differing layer must be explained by differing inputs).

What cannot run (no CUDA, a package missing) is a "skipped: ..." line, not an error; a
mismatch prints FAIL and makes the exit code 1. Nothing of the project (model, launcher) and no
optional package is imported at module level: the GPU machine may lack any of them. Prints a
table and one JSON line (last line of stdout); `--out FILE` writes the JSON too, after every check.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CHECKS = ("neuron_kernels", "train_step", "bf16_decisions", "energy_count")
# What each optional package is for here; a missing one is reported with this effect.
PACKAGES = {
    "triton": "Triton neuron kernels not checked (model.neurons falls back to the scripted loop)",
    "deepspeed": "training runs the plain-PyTorch path",
    "spikingjelly": "no SpikingJelly agreement or timing reference",
    "ffcv": "not needed: every input here is synthetic",
    "mlflow": "not needed: nothing is tracked",
}
# Must stay unloaded: the checks need no data pipeline (FFCV, the loaders). The config reads the
# dataset names from the import-light `data_pipeline` package. (deepspeed itself imports mlflow.)
UNWANTED_MODULES = ("data_pipeline.loaders", "ffcv")
OPTIONAL_MODULES = ("triton", "deepspeed", "spikingjelly", "mlflow")
ANCHOR_IMAGES_S = 246.0  # dense SEW-ResNet-18, AMP, per A100 (SEW authors' training logs)
GOAL_IMAGES_S = 500.0    # one H200, search phase with masks
FP32_GRAD_TOL = 1e-6     # |dx - ref| <= tol * max(1, |ref|)
BF16_GRAD_RTOL = 2.0 ** -7  # |dx - ref| <= rtol |ref| + 1e-6: both integrate in fp32, round once
SJ_GRAD_TOL = 1e-5       # SpikingJelly evaluates the same BPTT in another order of operations
T = 4


@dataclass
class Sizes:
    """Problem sizes of one mode; --smoke keeps the code paths and shrinks these."""

    kernel_m: int          # neurons per time step for the kernel comparisons
    timing_m: int          # neurons per time step for the timed calls
    timing_reps: int
    width: float
    input_size: int
    train_batches: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    decision_batch: int
    decision_steps: int
    energy_batch: int


GPU_SIZES = Sizes(kernel_m=(1 << 20) + 7, timing_m=64 * 64 * 56 * 56, timing_reps=20, width=1.0,
                  input_size=224, train_batches=(32, 64), warmup_steps=3, timed_steps=15,
                  decision_batch=32, decision_steps=20, energy_batch=2)
# kernel_m above model.neurons.CHUNK (32768): the CPU loop then runs several forked blocks.
SMOKE_SIZES = Sizes(kernel_m=40_003, timing_m=40_003, timing_reps=3, width=1 / 16, input_size=32,
                    train_batches=(2,), warmup_steps=1, timed_steps=1, decision_batch=2,
                    decision_steps=2, energy_batch=2)


class Budget:
    """Seconds left to one check; loops test it between units of work, never inside one."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.spent() >= self.seconds


@dataclass
class Check:
    """Rows (item, result, status) of one check plus the numbers that go into the JSON."""

    name: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self, item: str, result: str) -> None:
        self.rows.append((item, result, "ok"))

    def info(self, item: str, result: str) -> None:
        self.rows.append((item, result, "-"))

    def fail(self, item: str, result: str) -> None:
        self.rows.append((item, result, "FAIL"))

    def skip(self, item: str, reason: str) -> None:
        self.rows.append((item, f"skipped: {reason}", "skipped"))
        self.skipped.append(f"{item}: {reason}")

    def check(self, item: str, result: str, passed: bool) -> None:
        (self.ok if passed else self.fail)(item, result)

    @property
    def status(self) -> str:
        states = {s for _, _, s in self.rows}
        if "FAIL" in states:
            return "FAIL"
        return "ok" if "ok" in states else "skipped"

    def summary(self) -> dict:
        out = {"status": self.status, "seconds": round(self.seconds, 2), "skipped": self.skipped}
        if self.status == "skipped":
            out["reason"] = "; ".join(self.skipped) or "nothing ran"
        if self.status == "FAIL":
            out["failed"] = [f"{item}: {result}" for item, result, s in self.rows if s == "FAIL"]
        return {**out, **self.data}


@dataclass
class Ctx:
    args: argparse.Namespace
    device: torch.device
    sizes: Sizes

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def package_version(name: str) -> str | None:
    """Installed version without importing the package (an import can be slow or fail)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def timed_median(ctx: Ctx, fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps calls, device-synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


# --------------------------------------------------------------------------- 1. neuron kernels

def _neuron_variants():
    from model.neurons import MultiStepIF, MultiStepLIF

    return {
        "lif": lambda: MultiStepLIF(),
        "lif_no_decay_input": lambda: MultiStepLIF(decay_input=False),
        "lif_reset_grad": lambda: MultiStepLIF(detach_reset=False),
        "if": lambda: MultiStepIF(),
        "if_reset_grad": lambda: MultiStepIF(detach_reset=False),
    }


def _spikes_and_grad(neuron, x: torch.Tensor, g: torch.Tensor, device, dtype):
    """Forward + backward of one fresh neuron on (x, g) cast to device/dtype; results on CPU."""
    xd = x.detach().to(device, dtype, copy=True).requires_grad_(True)
    s = neuron(xd)
    s.backward(g.to(device, dtype))
    return s.detach().cpu(), xd.grad.detach().cpu()


def _grad_error(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                tol: float = FP32_GRAD_TOL) -> tuple[float, float]:
    """(max |got - ref|, max of |got - ref| / allowed): the second must be <= 1."""
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    if dtype == torch.bfloat16:
        allowed = BF16_GRAD_RTOL * ref.abs() + 1e-6
    else:
        allowed = tol * ref.abs().clamp_min(1.0)
    return float(err.max()), float((err / allowed).max())


def _import_spikingjelly():
    """SpikingJelly's neuron module, its CUDA dispatch forced to the torch implementation
    (read from the environment at import; 2.x would otherwise pick its own CUDA/Triton kernels)."""
    os.environ.setdefault("SJ_LIF_CUDA_IMPLEMENTATION", "torch")
    os.environ.setdefault("SJ_IF_CUDA_IMPLEMENTATION", "torch")
    from spikingjelly.activation_based import neuron, surrogate

    return {
        "lif": lambda: neuron.LIFNode(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                                      surrogate_function=surrogate.ATan(alpha=2.0),
                                      detach_reset=True, step_mode="m"),
        "if": lambda: neuron.IFNode(v_threshold=1.0, v_reset=0.0,
                                    surrogate_function=surrogate.ATan(alpha=2.0),
                                    detach_reset=True, step_mode="m"),
    }


def check_neuron_kernels(c: Check, ctx: Ctx, budget: Budget) -> None:
    from model import neurons_triton

    sz = ctx.sizes
    gen = torch.Generator().manual_seed(0)
    # mean 0.6, sd 1.5: many neurons fire, many sit close to the threshold
    x = torch.randn(T, sz.kernel_m, generator=gen) * 1.5 + 0.6
    g = torch.randn(T, sz.kernel_m, generator=gen)
    variants = _neuron_variants()
    if ctx.cuda and neurons_triton.AVAILABLE:
        label, device = "triton vs scripted cpu", ctx.device
    elif ctx.cuda:  # model.neurons then runs its scripted loop on the GPU
        c.skip("triton vs scripted cpu", "triton not installed")
        label, device = "scripted cuda vs scripted cpu", ctx.device
    else:
        c.skip("triton vs scripted cpu", "no CUDA")
        label, device = "scripted vs scripted cpu", torch.device("cpu")
    c.data["neuron_path"] = "triton" if device.type == "cuda" and neurons_triton.AVAILABLE else "scripted"
    comparisons = c.data.setdefault("comparisons", {})
    for dtype in (torch.float32, torch.bfloat16):
        if budget.expired():
            c.skip(f"{label} {_dtype_name(dtype)}", f"budget of {budget.seconds:g} s spent")
            continue
        worst_err = worst_ratio = 0.0
        differing = 0
        for name, make in variants.items():
            ref_s, ref_g = _spikes_and_grad(make(), x, g, "cpu", dtype)
            got_s, got_g = _spikes_and_grad(make(), x, g, device, dtype)
            n_diff = int((ref_s != got_s).sum())
            err, ratio = _grad_error(got_g, ref_g, dtype)
            comparisons[f"{name}/{_dtype_name(dtype)}"] = {
                "spikes_equal": n_diff == 0, "spikes_differing": n_diff,
                "grad_max_abs_err": err, "grad_err_over_tol": ratio}
            differing += n_diff
            worst_err, worst_ratio = max(worst_err, err), max(worst_ratio, ratio)
        tol = ("1e-6 max(1,|ref|)" if dtype == torch.float32 else "2^-7 |ref| + 1e-6")
        c.check(f"{label} {_dtype_name(dtype)}, {len(variants)} variants, {T}x{sz.kernel_m}",
                f"{'spikes equal' if differing == 0 else f'{differing} spikes differ'}, "
                f"max |dx err| {worst_err:.2g} ({worst_ratio:.2g} of tol {tol})",
                differing == 0 and worst_ratio <= 1.0)

    try:
        sj = _import_spikingjelly()
    except ImportError as exc:
        c.skip("spikingjelly", f"not importable ({exc})")
        sj = None
    dev = ctx.device
    if sj is not None and budget.expired():
        c.skip("ours vs spikingjelly", f"budget of {budget.seconds:g} s spent")
    elif sj is not None:
        ours = {"lif": variants["lif"], "if": variants["if"]}
        agreement = c.data.setdefault("spikingjelly_agreement", {})
        worst_ratio = 0.0
        differing = 0
        for name in ours:
            o_s, o_g = _spikes_and_grad(ours[name](), x, g, dev, torch.float32)
            s_s, s_g = _spikes_and_grad(sj[name](), x, g, dev, torch.float32)
            n_diff = int((o_s != s_s).sum())
            err, ratio = _grad_error(s_g, o_g, torch.float32, SJ_GRAD_TOL)
            agreement[name] = {"spikes_differing": n_diff, "grad_max_abs_err": err,
                               "grad_err_over_tol": ratio}
            differing += n_diff
            worst_ratio = max(worst_ratio, ratio)
        c.check(f"ours vs spikingjelly fp32 on {dev.type}, lif + if",
                f"{'spikes equal' if differing == 0 else f'{differing} spikes differ'}, "
                f"dx within {worst_ratio:.2g} of tol 1e-5 max(1,|ref|)",
                differing == 0 and worst_ratio <= 1.0)

    timing = c.data.setdefault("timing_ms", {})
    m = sz.timing_m
    xt = torch.randn(T, m, generator=gen, device="cpu").mul_(1.5).add_(0.6)
    gt = torch.randn(T, m, generator=gen, device="cpu")
    for dtype in (torch.float32, torch.bfloat16):
        xd, gd = xt.to(dev, dtype), gt.to(dev, dtype)
        for name in ("lif", "if"):
            item = f"time fwd+bwd {name} {_dtype_name(dtype)} {T}x{_si(m)} on {dev.type}"
            if budget.expired():
                c.skip(item, f"budget of {budget.seconds:g} s spent")
                continue
            leaf = xd.detach().requires_grad_(True)

            def call(neuron, reset):
                leaf.grad = None
                if reset:
                    neuron.reset()
                neuron(leaf).backward(gd)

            ours_neuron = variants[name]()
            ours_ms = 1e3 * timed_median(ctx, lambda: call(ours_neuron, False), sz.timing_reps)
            row = {"ours": round(ours_ms, 4)}
            text = f"ours ({c.data['neuron_path'] if dev.type == 'cuda' else 'scripted'}) {ours_ms:.3g} ms"
            if sj is not None:
                sj_neuron = sj[name]().to(dev)
                sj_ms = 1e3 * timed_median(ctx, lambda: call(sj_neuron, True), sz.timing_reps)
                row.update(spikingjelly_torch=round(sj_ms, 4), speedup=round(sj_ms / ours_ms, 3))
                text += f", spikingjelly torch {sj_ms:.3g} ms: {sj_ms / ours_ms:.2f}x"
            timing[f"{name}/{_dtype_name(dtype)}"] = row
            c.info(item, text)
            del leaf
    if ctx.cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 2. training step

def training_runs(ctx: Ctx, check: Check, decisions: bool) -> list[tuple[str, str]]:
    """(engine, precision) pairs to run. auto: DeepSpeed if installed, else plain PyTorch.
    --smoke runs the plain path (the one the GPU machine, without DeepSpeed, takes) in both
    precisions and DeepSpeed in fp32 only: its bf16 casts parameters but not BatchNorm buffers,
    and CPU batch_norm rejects that mix. bf16_decisions then uses the plain path."""
    requested = ctx.args.engine
    plain = [("plain", "fp32"), ("plain", "bf16")]
    if requested == "plain":
        return plain
    if importlib.util.find_spec("deepspeed") is None:
        if requested == "auto":
            check.skip("deepspeed engine", "deepspeed not installed: plain-PyTorch path instead")
            return plain
        check.skip("deepspeed engine", "deepspeed not installed")
        return []
    ds = [("deepspeed", "fp32"), ("deepspeed", "bf16")]
    if ctx.cuda:
        return ds
    check.skip("deepspeed bf16", "not run on the CPU (DeepSpeed casts parameters, not "
               "BatchNorm buffers, to bf16; CPU batch_norm rejects the mix)")
    if decisions:
        return plain if requested == "auto" else []
    return ds[:1] if requested == "deepspeed" else plain + ds[:1]


class SearchRun:
    """One search-phase set-up as launcher.train builds it: SEW-ResNet-18 with soft masks, the
    recipe's MaskWeightOptimizer (configs/imagenet_sew18.yaml) and the energy penalty; through
    the DeepSpeed engine (ZeRO 1, world size 1) or plain PyTorch with autocast for bf16."""

    def __init__(self, ctx: Ctx, engine: str, precision: str, batch: int, seed: int = 0):
        from launcher.config import load_config
        from launcher.ds_config import build_ds_config
        from launcher.optimizer import build_optimizer
        from model import build_model
        from model.masks import mask_logits, set_beta, set_mask_mode, weight_params
        from model.penalty import penalty_terms

        sz = ctx.sizes
        self.ctx, self.engine_kind, self.precision = ctx, engine, precision
        self.cfg = load_config(REPO / "configs" / "imagenet_sew18.yaml", [
            f"data.batch_size={batch}", f"deepspeed.precision={precision}", "deepspeed.zero_stage=1",
            "optim.grad_accum=1", "tracking.enabled=false"])
        torch.manual_seed(seed)
        net = build_model("sew_resnet18", num_classes=1000, T=T, width=sz.width, input_size=sz.input_size)
        set_mask_mode(net, "soft")
        # beta as at the start of a search (beta_at(0, ...) = beta_0)
        set_beta(net, self.cfg.pruning.beta_0)
        optimizer = build_optimizer(mask_logits(net), weight_params(net), self.cfg)
        self.in_dtype = torch.float32
        self.engine = None
        self.backend = None
        if engine == "deepspeed":
            import deepspeed

            from launcher.distributed import setup_distributed

            info = setup_distributed()
            ds_config = build_ds_config(self.cfg, info.world_size, info.on_gpu)
            self.engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
            self.backend = info.backend
            if ds_config["bf16"]["enabled"]:
                self.in_dtype = torch.bfloat16
        else:
            net.to(ctx.device)
        self.net, self.optimizer = net, optimizer
        self.terms = penalty_terms(net)

    def autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16,
                              enabled=self.engine is None and self.precision == "bf16")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from model.penalty import energy_penalty

        p = self.cfg.pruning
        if self.engine is not None:
            out = self.engine(x)
        else:
            with self.autocast():
                out = self.net(x)
        loss = self.net.loss(out.float(), y) + energy_penalty(self.net, p.lambda_w, p.lambda_n, self.terms)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic (images, labels) made on the device: the same for every precision."""
        gen = torch.Generator(self.ctx.device).manual_seed(seed)
        size = self.ctx.sizes.input_size
        x = torch.randn(n, 3, size, size, generator=gen, device=self.ctx.device)
        y = torch.randint(0, 1000, (n,), generator=gen, device=self.ctx.device)
        return x.to(self.in_dtype), y

    def close(self) -> None:
        self.engine = self.net = self.optimizer = self.terms = None
        gc.collect()
        if self.ctx.cuda:
            torch.cuda.empty_cache()


def check_train_step(c: Check, ctx: Ctx, budget: Budget) -> None:
    sz = ctx.sizes
    pairs = training_runs(ctx, c, decisions=False)
    c.data["anchor_images_s"] = ANCHOR_IMAGES_S
    c.data["goal_images_s"] = GOAL_IMAGES_S
    c.data["model"] = {"name": "sew_resnet18", "width": sz.width, "input_size": sz.input_size, "T": T}
    runs = c.data.setdefault("runs", [])
    for engine, precision in pairs:
        for batch in sz.train_batches:
            item = f"{engine} {precision} batch {batch}"
            if budget.expired():
                c.skip(item, f"budget of {budget.seconds:g} s spent")
                continue
            try:
                run = SearchRun(ctx, engine, precision, batch)
            except ImportError as exc:
                c.skip(item, f"not importable ({exc})")
                continue
            x, y = run.batch(batch, seed=1)
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            for _ in range(sz.warmup_steps):
                run.step(x, y)
            ctx.sync()
            steps, t0 = 0, time.perf_counter()
            while steps < sz.timed_steps and (steps == 0 or not budget.expired()):
                run.step(x, y)
                steps += 1
            ctx.sync()
            elapsed = time.perf_counter() - t0
            images_s = batch * steps / elapsed
            peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
            runs.append({"engine": engine, "backend": run.backend, "precision": precision,
                         "batch": batch, "steps": steps, "images_s": round(images_s, 2),
                         "peak_gib": None if peak is None else round(peak, 3)})
            mem = f", peak {peak:.2f} GiB" if peak is not None else ""
            via = f" ({run.backend})" if run.backend else ""
            c.ok(item + via, f"{images_s:.4g} images/s{mem} over {steps} steps "
                 f"(anchor {ANCHOR_IMAGES_S:g}/s dense AMP A100)")
            run.close()
    if runs and ctx.cuda and sz.width == 1.0:
        best = max(r["images_s"] for r in runs)
        c.data["goal_met"] = best >= GOAL_IMAGES_S
        c.info("goal", f"best {best:.4g} images/s vs goal {GOAL_IMAGES_S:g}: "
               f"{'met' if best >= GOAL_IMAGES_S else 'not met'}")


# --------------------------------------------------------------------------- 3. bf16 decisions

def _decisions(net) -> dict[str, torch.Tensor]:
    from model.masks import masked_modules

    return {name: m.logits.detach().float().cpu() > 0 for name, m in masked_modules(net)
            if m.logits is not None}


def check_bf16_decisions(c: Check, ctx: Ctx, budget: Budget) -> None:
    from model.energy_count import measure_energy
    from model.masks import NeuronMask, masked_modules

    sz = ctx.sizes
    pairs = training_runs(ctx, c, decisions=True)
    if not pairs:
        return
    engine = pairs[0][0]
    try:
        runs = {p: SearchRun(ctx, engine, p, sz.decision_batch, seed=0) for p in ("fp32", "bf16")}
    except ImportError as exc:
        c.skip(f"{engine} search", f"not importable ({exc})")
        return
    steps = 0
    # Interleaved, so a spent budget stops both runs at the same step.
    while steps < sz.decision_steps and (steps == 0 or not budget.expired()):
        for run in runs.values():
            x, y = run.batch(sz.decision_batch, seed=100 + steps)
            run.step(x, y)
        steps += 1
    decisions = {p: _decisions(r.net) for p, r in runs.items()}
    kinds = {name: "neuron" if isinstance(m, NeuronMask) else "weight"
             for name, m in masked_modules(runs["fp32"].net) if m.logits is not None}
    differ = {"all": 0, "weight": 0, "neuron": 0}
    total = {"all": 0, "weight": 0, "neuron": 0}
    for name, a in decisions["fp32"].items():
        n = int((a != decisions["bf16"][name]).sum())
        for k in ("all", kinds[name]):
            differ[k] += n
            total[k] += a.numel()
    fraction = {k: differ[k] / total[k] if total[k] else 0.0 for k in total}
    sops = {}
    for p, run in runs.items():
        x, _ = run.batch(sz.decision_batch, seed=99)
        with run.autocast():
            report = measure_energy(run.net, [(x,)])
        sops[p] = report.sops_per_sample
        c.data[f"weight_keep_{p}"], c.data[f"neuron_keep_{p}"] = report.weight_keep, report.neuron_keep
    for run in runs.values():
        run.close()
    c.data.update(engine=engine, steps=steps, logits=total["all"], fraction_differing=fraction["all"],
                  fraction_differing_weights=fraction["weight"],
                  fraction_differing_neurons=fraction["neuron"], sops_per_sample=sops)
    c.ok(f"{engine}, {steps} search steps, batch {sz.decision_batch}, one seed",
         f"{fraction['all']:.4%} of {_si(total['all'])} decisions differ "
         f"(weights {fraction['weight']:.4%}, neurons {fraction['neuron']:.4%})")
    rel = abs(sops["bf16"] - sops["fp32"]) / sops["fp32"] if sops["fp32"] else 0.0
    c.info("hard-mask SOPs/sample", f"fp32 {_si(sops['fp32'])}, bf16 {_si(sops['bf16'])} ({rel:.2%} apart)")


# --------------------------------------------------------------------------- 4. energy count

def _measured(net, x: torch.Tensor, device: torch.device):
    """measure_energy of net on x, plus the total input of every counted layer (float64): if
    two devices' counts differ, equal inputs point at the counter, unequal at the forward."""
    from model.energy_count import measure_energy
    from model.masks import weight_layers

    inputs: dict[str, float] = {}
    handles = []
    for name, layer in weight_layers(net):
        if layer.counted:
            def hook(module, args, name=name):
                inputs[name] = inputs.get(name, 0.0) + float(args[0].detach().double().sum())
            handles.append(layer.register_forward_pre_hook(hook))
    try:
        report = measure_energy(net.to(device), [(x.to(device),)])
    finally:
        for h in handles:
            h.remove()
    return report, inputs


def check_energy_count(c: Check, ctx: Ctx, budget: Budget) -> None:
    from model import build_model
    from model.masks import masked_modules

    sz = ctx.sizes
    torch.manual_seed(0)
    net = build_model("sew_resnet18", num_classes=1000, T=T, width=sz.width, input_size=sz.input_size)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # about half of every mask kept
        for _, m in masked_modules(net):
            if m.logits is not None:
                m.logits.copy_(torch.randn(m.logits.shape, generator=gen))
    x = torch.randn(sz.energy_batch, 3, sz.input_size, sz.input_size, generator=gen)
    other = ctx.device if ctx.cuda else torch.device("cpu")
    where = f"cpu vs {other.type}" + ("" if ctx.cuda else " (second copy)")
    for dtype in (torch.float64, torch.float32):
        item = f"{_dtype_name(dtype)} {where}, batch {sz.energy_batch}"
        if budget.expired():
            c.skip(item, f"budget of {budget.seconds:g} s spent")
            continue
        ref, ref_in = _measured(copy.deepcopy(net).to(dtype), x.to(dtype), torch.device("cpu"))
        got, got_in = _measured(copy.deepcopy(net).to(dtype), x.to(dtype), other)
        rows = list(zip(ref.layers, got.layers))
        equal = [a.name for a, b in rows if a.sops_per_sample == b.sops_per_sample]
        counted = [a.name for a, _ in rows if a.counted]
        unexplained = [a.name for a, b in rows if a.sops_per_sample != b.sops_per_sample
                       and ref_in.get(a.name) == got_in.get(a.name)]
        inputs_differ = [n for n in counted if ref_in.get(n) != got_in.get(n)]
        max_rel = max((abs(a.sops_per_sample - b.sops_per_sample) / a.sops_per_sample
                       for a, b in rows if a.sops_per_sample), default=0.0)
        c.data[_dtype_name(dtype)] = {
            "layers": len(rows), "layers_equal": len(equal), "counted_layers": len(counted),
            "devices": ["cpu", str(other)], "sops_per_sample": [ref.sops_per_sample, got.sops_per_sample],
            "max_rel_diff": max_rel, "layers_with_different_inputs": inputs_differ,
            "unexplained": unexplained}
        text = (f"{len(equal)}/{len(rows)} layers' SOPs equal, {_si(ref.sops_per_sample)} vs "
                f"{_si(got.sops_per_sample)} SOPs/sample")
        if dtype == torch.float64 or not ctx.cuda:
            c.check(item, text, len(equal) == len(rows) and ref.sops_per_sample > 0)
        else:
            # float32: cuDNN and the CPU round convs differently, so a neuron at its threshold
            # may fire on one device only; a count may only differ where its inputs do.
            if len(equal) < len(rows):
                text += (f" (max rel diff {max_rel:.2g}; inputs differ in {len(inputs_differ)} layers,"
                         f" unexplained {len(unexplained)})")
            c.check(item, text, not unexplained)


# --------------------------------------------------------------------------- driver

def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("check", "item", "result", "status")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, doc: dict) -> None:
    if not path:
        return
    from model.atomic import atomic_write

    atomic_write(path, json.dumps(doc) + "\n")


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="seconds per check (4 checks: the default fits 8 minutes)")
    p.add_argument("--out", help="also write the JSON line to this file")
    p.add_argument("--engine", choices=("auto", "deepspeed", "plain"), default="auto",
                   help="training path; auto: DeepSpeed if installed, else plain PyTorch")
    p.add_argument("--decision-steps", type=int, default=None,
                   help="search steps per precision in bf16_decisions")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset")
    args = p.parse_args(argv)
    wanted = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = copy.copy(SMOKE_SIZES if args.smoke else GPU_SIZES)
    if args.decision_steps:
        sizes.decision_steps = args.decision_steps
    ctx = Ctx(args, device, sizes)
    t_start = time.perf_counter()
    packages = {name: package_version(name) for name in PACKAGES}
    rows = [("packages", name, version if version else f"skipped: not installed: {effect}",
             "ok" if version else "skipped") for (name, effect), version in
            zip(PACKAGES.items(), packages.values())]
    if device.type != "cuda":
        rows.append(("device", str(device), "skipped: no CUDA" + (" (--smoke)" if args.smoke else ""),
                     "skipped"))
    doc = {"benchmark": "gpu_check", "smoke": args.smoke, "budget_s": args.budget_s,
           **environment(device), "packages": packages, "checks": {}}
    functions = {"neuron_kernels": check_neuron_kernels, "train_step": check_train_step,
                 "bf16_decisions": check_bf16_decisions, "energy_count": check_energy_count}
    for name in CHECKS:
        c = Check(name)
        if name not in wanted:
            c.skip("check", "not selected (--checks)")
        else:
            budget = Budget(args.budget_s)
            try:
                functions[name](c, ctx, budget)
            except ImportError as exc:
                c.skip("import", f"not importable ({exc})")
            except Exception as exc:  # a crash is a finding: FAIL, then the other checks
                traceback.print_exc()
                c.fail("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            c.seconds = budget.spent()
        rows += [(name, item, result, status) for item, result, status in c.rows]
        doc["checks"][name] = c.summary()
        print(f"[gpu_check] {name}: {c.status} ({c.seconds:.1f} s)", file=sys.stderr, flush=True)
        write_json(args.out, doc)
    doc["failed"] = [n for n, s in doc["checks"].items() if s["status"] == "FAIL"]
    doc["seconds"] = round(time.perf_counter() - t_start, 2)
    loaded = {m.split(".")[0] for m in sys.modules}
    doc["unwanted_modules_loaded"] = sorted(m for m in UNWANTED_MODULES if m in sys.modules)
    doc["optional_modules_loaded"] = sorted(loaded & set(OPTIONAL_MODULES))
    if importlib.util.find_spec("launcher") is not None and "launcher.distributed" in sys.modules:
        from launcher.distributed import cleanup

        cleanup()
    env = f"{doc['device']}" + (f" ({doc['device_name']})" if "device_name" in doc else "")
    print(f"gpu_check on {env}, torch {doc['torch']}, python {doc['python']}, "
          f"{'smoke sizes' if args.smoke else 'full sizes'}, budget {args.budget_s:g} s per check")
    print(table(rows))
    print("result: " + ("FAIL " + ", ".join(doc["failed"]) if doc["failed"] else "ok")
          + f" ({doc['seconds']:.1f} s)")
    write_json(args.out, doc)
    print(json.dumps(doc), flush=True)
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
