"""`python -m deploy.run RUN_DIR [--split test] [--batch-size N] [--threads N]` (docs/DEPLOY.md):
the run's hardened network through the event engine: top-1, images/s, latency, and the counted
synaptic operations next to the energy report's. Exit 2 with one line on a bad run dir."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    from deploy.engine import EventEngine
    from deploy.rundir import DeployError, open_run
    try:
        run = open_run(args.run_dir)
        engine = EventEngine.from_run(run)
        loader = run.loader(args.split, args.batch_size)
        correct = n = 0
        sops = np.zeros(len(engine.layers))
        lat = []
        for x, y in loader:
            t0 = time.perf_counter()
            res = engine.run(x, threads=args.threads)
            lat.append(time.perf_counter() - t0)
            correct += int((res.logits.argmax(1) == y.numpy()).sum())
            n += x.shape[0]
            sops += res.sops.sum(0)
    except DeployError as exc:
        print(f"deploy.run: {exc}", file=sys.stderr)
        return 2
    total = sum(lat)
    ref = run.energy.get("sops_per_sample", run.results.get("sops_per_sample"))
    ours = float(sum(s / n for s in sops))
    print(f"{run.path}: {args.split} {n} samples, batch {args.batch_size}")
    print(f"top-1 {correct / n:.4f} (results.json test_top1 {run.results.get('test_top1')})")
    print(f"{n / total:.1f} images/s, batch latency p50 {1e3 * np.percentile(lat, 50):.2f} ms "
          f"p95 {1e3 * np.percentile(lat, 95):.2f} ms (first batch includes the kernel load)")
    print(f"synaptic additions/sample {ours:.6g} (energy report {ref})")
    for name, s in zip(engine.layers, sops):
        print(f"  {name:<24}{s / n:>14.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
