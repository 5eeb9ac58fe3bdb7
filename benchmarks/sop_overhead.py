"""Cost of SOP counting: an eval pass of a scaled CIFAR net with and without `SOPCounter`.

    .venv/bin/python benchmarks/sop_overhead.py [--width 0.25] [--T 8] [--batch 32] [--repeats 15]

Plain and counted passes run in back-to-back pairs (order alternating) and the overhead is
the median of the paired ratios, so that drift in machine load hits both alike. The per-batch overhead is what the hooks add; the counter's one-off costs (structural
pass and fan-out maps on entry, dot products in `report()`) are shown separately and
amortised over a 10,000-image evaluation. Target: <= 5 % (issue 3). Prints a table and one
JSON line. CPU only: that is where the eval pass is cheapest, so the relative overhead largest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model import build_model
from model.energy import SOPCounter
from model.masks import mask_logits, set_mask_mode

EVAL_SET = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = build_model("cifar10_6conv2fc", width=args.width, T=args.T).eval()
    with torch.no_grad():
        for p in mask_logits(net):  # a half-pruned subnetwork
            p.copy_(torch.randn(p.shape))
    set_mask_mode(net, "hard")
    x = torch.randn(args.batch, *net.input_shape)

    def timed(fn) -> tuple[float, float]:
        """(wall, process CPU) seconds of fn(); CPU time is less disturbed by other processes."""
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0

    with torch.no_grad():
        for _ in range(2):
            net(x)
        plain, counted, setup = [], [], []
        for i in range(args.repeats):
            if i % 2:
                plain.append(timed(lambda: net(x)))
            t0 = time.perf_counter()
            with SOPCounter(net) as counter:
                setup.append(time.perf_counter() - t0)
                counted.append(timed(lambda: net(x)))
            if not i % 2:
                plain.append(timed(lambda: net(x)))
        report_s = timed(counter.report)[0]
    setup_s = statistics.median(setup)

    def overhead(k: int) -> float:
        """Median of paired ratios: each pair ran back to back, under the same machine load."""
        return 100 * (statistics.median(c[k] / p[k] for c, p in zip(counted, plain)) - 1)

    plain_s, counted_s = (statistics.median(t[0] for t in ts) for ts in (plain, counted))
    overhead_pct, overhead_cpu_pct = overhead(0), overhead(1)
    batches = -(-EVAL_SET // args.batch)
    eval_overhead_pct = overhead_pct + 100 * (setup_s + report_s) / (batches * plain_s)
    rows = [("eval pass, plain", f"{1e3 * plain_s:.1f} ms"),
            ("eval pass, SOPCounter hooks", f"{1e3 * counted_s:.1f} ms"),
            ("per-batch overhead, wall", f"{overhead_pct:+.2f} %"),
            ("per-batch overhead, CPU time", f"{overhead_cpu_pct:+.2f} %"),
            ("counter setup (once)", f"{1e3 * setup_s:.1f} ms"),
            ("report (once)", f"{1e3 * report_s:.1f} ms"),
            (f"overhead over a {EVAL_SET:,}-image eval", f"{eval_overhead_pct:+.2f} %")]
    print(f"cifar10_6conv2fc width {args.width}, T {args.T}, batch {args.batch}, hard masks, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v.rjust(10)}")
    print(json.dumps({"benchmark": "sop_overhead", "model": "cifar10_6conv2fc", "width": args.width,
                      "T": args.T, "batch": args.batch, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "plain_ms": 1e3 * plain_s,
                      "counted_ms": 1e3 * counted_s, "overhead_pct": overhead_pct,
                      "overhead_cpu_pct": overhead_cpu_pct,
                      "setup_ms": 1e3 * setup_s, "report_ms": 1e3 * report_s,
                      "eval_set_overhead_pct": eval_overhead_pct}))


if __name__ == "__main__":
    main()
