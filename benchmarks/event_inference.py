"""Event engine vs the dense paths (PyTorch eager, torch.compile) on the same masked network.

Cases, side by side in one process on real Fashion-MNIST test images (the demo data):
- demo: the hardened network of a finished run (`--run`; without it configs/demo.yaml is trained
  into benchmarks/out/demo_run first);
- paper: the full-width 6Conv2FC (T 8) with random hard masks at the demo run's per-layer
  weight and neuron keep ratios, each layer's kept weights rescaled by 1/sqrt(keep) so currents
  keep their dense scale (random masks, not trained ones: docs/DEPLOY.md says so).
Batch 1 and 64: images/s, latency p50/p95; peak RSS of the process; spike mismatches of every
layer against PyTorch on `--mismatch-samples` test images (default: the whole split).

    .venv/bin/python benchmarks/event_inference.py [--run RUN_DIR] [--repeats 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.train_step import peak_rss_mb  # noqa: E402
from deploy.engine import EventEngine  # noqa: E402
from deploy.rundir import open_run  # noqa: E402
from model import build_model  # noqa: E402
from model.layers import ConvBNSpike, LinearSpike, StaticConvBNSpike  # noqa: E402
from model.masks import masked_modules, set_mask_mode  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_run(path: str | None) -> str:
    if path:
        return path
    out = os.path.join(REPO, "benchmarks", "out", "demo_run")
    if not os.path.isfile(os.path.join(out, "results.json")):
        subprocess.run([sys.executable, "-m", "launcher.train", "--config", "configs/demo.yaml",
                        f"checkpoint.run_dir={out}", "tracking.enabled=false"], cwd=REPO, check=True)
    return out


def side_by_side(paths: dict, x: torch.Tensor, batch: int, rounds: int) -> dict:
    """Each path on the same batches, in rounds: per round every path runs all of x's batches
    back to back (a served model keeps its caches warm), so the machine's drift (this 2-core
    VM's speed moves by 2x within minutes) hits every path alike. Batch 1 walks through the
    images of x one at a time (an image's spike count sets the engine's work)."""
    batches = [x[i:i + batch] for i in range(0, x.shape[0] - batch + 1, batch)]
    ts = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            fn(batches[0])
            for xb in batches:
                t0 = time.perf_counter()
                fn(xb)
                ts[name].append(time.perf_counter() - t0)
    return {name: {"images_s": batch / statistics.median(v), "p50_ms": 1e3 * np.percentile(v, 50),
                   "p95_ms": 1e3 * np.percentile(v, 95)} for name, v in ts.items()}


def mismatches(net, engine, loader, limit: int) -> tuple[int, int]:
    """(spikes that differ over all layers, samples compared)."""
    store = {}
    for n, m in net.named_modules():
        if isinstance(m, (ConvBNSpike, StaticConvBNSpike)) or (isinstance(m, LinearSpike) and m.neuron):
            m.register_forward_hook(lambda mod, a, o, n=n: store.__setitem__(n, o))
    bad = seen = 0
    with torch.no_grad():
        for x, _ in loader:
            x = x[: limit - seen]
            net(x)
            res = engine.run(x, record=True)
            bad += sum(int((store[k].numpy().reshape(s.shape) != s).sum()) for k, s in res.spikes.items())
            seen += x.shape[0]
            if seen >= limit:
                break
    return bad, seen


def paper_net(demo) -> torch.nn.Module:
    """Full width, the demo's per-layer keep ratios as random hard masks (see module doc)."""
    torch.manual_seed(0)
    net = build_model("cifar10_6conv2fc", num_classes=10, T=8, width=1.0)
    ratios = {n: float((m.logits > 0).float().mean()) for n, m in masked_modules(demo) if m.logits is not None}
    with torch.no_grad():
        for n, m in masked_modules(net):
            if m.logits is None or n not in ratios:
                continue
            keep = max(ratios[n], 1e-4)
            m.logits.copy_(torch.where(torch.rand(m.logits.shape) < keep, 1.0, -1.0))
            owner = net.get_submodule(n)
            if hasattr(owner, "weight") and owner.weight is not None and m.logits.shape == owner.weight.shape:
                owner.weight.mul_(keep ** -0.5)
    set_mask_mode(net, "hard")
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--mismatch-samples", type=int, default=10**9)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-paper", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = open_run(demo_run(args.run))
    net = run.net
    engine = EventEngine(net)
    x64, _ = next(iter(run.loader("test", 64)))
    rows, dense_best = [], {}
    paths = {"engine": lambda x: engine.run(x, threads=args.threads), "eager": lambda x: net(x)}
    if not args.no_compile:
        try:
            compiled = torch.compile(net)
            with torch.no_grad():
                compiled(x64[:1]), compiled(x64)
            paths["compile"] = lambda x: compiled(x)
        except Exception as exc:  # torch.compile needs a C++ toolchain; report, do not fail
            print(f"torch.compile unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    with torch.no_grad():
        for b, rounds in ((1, args.repeats), (64, args.repeats)):
            for name, r in side_by_side(paths, x64, b, rounds).items():
                rows.append(("demo", name, b, r))
                if name != "engine":
                    dense_best[b] = max(dense_best.get(b, 0), r["images_s"])
    speed = {b: next(r for c, n, bb, r in rows if c == "demo" and n == "engine" and bb == b)["images_s"] / dense_best[b]
             for b in (1, 64)}
    bad, seen = mismatches(net, engine, run.loader("test", 256), args.mismatch_samples)
    paper_speed = None
    if not args.no_paper:
        pnet = paper_net(net)
        pengine = EventEngine(pnet)
        with torch.no_grad():
            r = side_by_side({"engine": lambda x: pengine.run(x, threads=args.threads), "eager": lambda x: pnet(x)},
                             x64[:8], 1, 1)
        pe, pd = r["engine"], r["eager"]
        rows += [("paper", "engine", 1, pe), ("paper", "eager", 1, pd)]
        paper_speed = pe["images_s"] / pd["images_s"]
        pbad, pseen = mismatches(pnet, pengine, run.loader("test", 4), 4)
        bad += pbad
    print(f"demo run {run.path} (connectivity {100 * run.results['connectivity']:.3g} %), "
          f"{args.threads} threads; paths take turns in rounds; batch 1 (the 64 images one at a time) and "
          f"batch 64: {args.repeats} rounds each; medians")
    print(f"{'case':<7}{'path':<9}{'batch':>6}{'images/s':>11}{'p50 ms':>9}{'p95 ms':>9}")
    for case, name, b, r in rows:
        print(f"{case:<7}{name:<9}{b:>6}{r['images_s']:>11.1f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}")
    print(f"spike mismatches {bad} over {seen} demo test images (every layer) + paper case; "
          f"peak RSS {peak_rss_mb():.0f} MB")
    print(json.dumps({"benchmark": "event_inference", "speedup_b1": round(speed[1], 3),
                      "speedup_b64": round(speed[64], 3), "mismatches": bad,
                      "mismatch_samples": seen, "connectivity": run.results["connectivity"],
                      "paper_scale_speedup_b1": None if paper_speed is None else round(paper_speed, 3),
                      "peak_rss_mb": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
