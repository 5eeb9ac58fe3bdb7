"""Cost of SOP counting: an eval pass of a scaled CIFAR net with and without `SOPCounter`.

    .venv/bin/python benchmarks/sop_overhead.py [--width 0.25] [--T 8] [--batch 32] [--repeats 15]
                                             [--threads N]

Plain and counted passes run in back-to-back pairs, order alternating, so that drift in
machine load hits both alike; `overhead_pct` is the median of their ratios. On a busy machine
whole passes are noisy, so the hooks' own work, replayed alone on one pass's tensors, is timed
as well. The per-batch overhead is what the hooks add; the counter's one-off costs (structural pass and fan-out maps
on entry, dot products in `report()`) are shown separately and amortised over a 10,000-image
evaluation. Target: <= 5 % (issue 3). Prints a table and one JSON line. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model import build_model
from model.energy_count import SOPCounter
from model.masks import mask_logits, set_mask_mode

EVAL_SET = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is steadiest on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = build_model("cifar10_6conv2fc", width=args.width, T=args.T).eval()
    with torch.no_grad():
        for p in mask_logits(net):  # a half-pruned subnetwork
            p.copy_(torch.randn(p.shape))
    set_mask_mode(net, "hard")
    x = torch.randn(args.batch, *net.input_shape)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

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
        report_s = timed(counter.report)
        hook_s = replayed_hooks(net, x, args.repeats)
    setup_s = statistics.median(setup)
    plain_s, counted_s = statistics.median(plain), statistics.median(counted)
    overhead_pct = 100 * (statistics.median(c / p for c, p in zip(counted, plain)) - 1)
    # load only ever adds time: the fastest run of each estimates its own cost
    min_pct = 100 * (min(counted) / min(plain) - 1)
    hook_pct = 100 * hook_s / min(plain)
    batches = -(-EVAL_SET // args.batch)
    eval_overhead_pct = overhead_pct + 100 * (setup_s + report_s) / (batches * plain_s)
    rows = [("eval pass, plain (median / min)", f"{1e3 * plain_s:.1f} / {1e3 * min(plain):.1f} ms"),
            ("eval pass, SOPCounter (median / min)", f"{1e3 * counted_s:.1f} / {1e3 * min(counted):.1f} ms"),
            ("overhead, median of back-to-back pairs", f"{overhead_pct:+.2f} %"),
            ("overhead, min / min", f"{min_pct:+.2f} %"),
            ("hooks' work replayed alone (min)", f"{1e3 * hook_s:.1f} ms = {hook_pct:.2f} %"),
            ("counter setup (once)", f"{1e3 * setup_s:.1f} ms"),
            ("report (once)", f"{1e3 * report_s:.1f} ms"),
            (f"overhead over a {EVAL_SET:,}-image eval", f"{eval_overhead_pct:+.2f} %")]
    print(f"cifar10_6conv2fc width {args.width}, T {args.T}, batch {args.batch}, hard masks, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v.rjust(18)}")
    print(json.dumps({"benchmark": "sop_overhead", "model": "cifar10_6conv2fc", "width": args.width,
                      "T": args.T, "batch": args.batch, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "plain_ms": 1e3 * plain_s,
                      "counted_ms": 1e3 * counted_s, "overhead_pct": overhead_pct,
                      "overhead_min_pct": min_pct, "hook_work_pct": hook_pct, "setup_ms": 1e3 * setup_s,
                      "report_ms": 1e3 * report_s, "eval_set_overhead_pct": eval_overhead_pct}))


def replayed_hooks(net, x: torch.Tensor, repeats: int) -> float:
    """Fastest time of the counter's hooks alone, replayed in call order on one pass's tensors.

    Short and memory-bound, this figure moves far less with machine load than a whole pass."""
    calls = []

    def logged(hook, module):
        def call(*args):
            calls.append((hook, module, args))
            return hook(*args)
        return call

    with SOPCounter(net):
        hooked = [(m, hooks) for m in net.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)]
        for m, hooks in hooked:
            for key, hook in list(hooks.items()):
                hooks[key] = logged(hook, m)
        net(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for hook, _, args in calls:
                hook(*args)
            times.append(time.perf_counter() - t0)
    return min(times)


if __name__ == "__main__":
    main()
