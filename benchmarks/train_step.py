"""Forward + backward of one training step: our neurons vs SpikingJelly's, same network.

The scaled CIFAR 6Conv2FC (width 0.25, T = 8, batch 16, soft masks) is built once with our
modules; the SpikingJelly copy is the same network with every neuron replaced by
`spikingjelly.activation_based.neuron.LIFNode(step_mode="m", backend="torch")` (same tau,
threshold, reset, ATan surrogate), reset with `functional.reset_net` after each step as its
users do. Both run side by side in this process, alternating, on the same inputs.

Memory: bytes of the tensors autograd saves for backward during one step (the activation
memory that dominates training), counted with saved_tensors_hooks; plus peak RSS per variant
from a child process.

    .venv/bin/python benchmarks/train_step.py [--width 0.25 --T 8 --batch 16 --repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import build_model  # noqa: E402
from model.masks import set_beta  # noqa: E402


def spikingjelly_copy(net: torch.nn.Module) -> torch.nn.Module:
    from spikingjelly.activation_based import neuron, surrogate

    sj = copy.deepcopy(net)
    for module in sj.modules():
        if getattr(module, "neuron", None) is not None:
            module.neuron = neuron.LIFNode(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                                           detach_reset=True, surrogate_function=surrogate.ATan(alpha=2.0),
                                           step_mode="m")
    return sj


def step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reset) -> None:
    out = net(x)
    net.loss(out, y).backward()
    if reset is not None:
        reset(net)
    net.zero_grad(set_to_none=True)


def saved_bytes(net, x, y, reset) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(net, x, y, reset)
    return total


def build(args):
    torch.manual_seed(0)
    net = build_model("cifar10_6conv2fc", width=args.width, T=args.T)
    set_beta(net, 5.0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    return net, x, y


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries it over fork + exec, so
    a child started by a 1.6 GB parent would report at least 1.6 GB; VmHWM belongs to the new
    address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc (macOS)


def child_peak_rss(args, variant: str) -> float:
    """Peak RSS (MB) of a fresh process doing `repeats` steps of one variant."""
    cmd = [sys.executable, __file__, "--child", variant, "--width", str(args.width), "--T", str(args.T),
           "--batch", str(args.batch), "--repeats", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--child", choices=["ours", "spikingjelly"])
    args = p.parse_args()

    from spikingjelly.activation_based import functional

    net, x, y = build(args)
    variants = {"ours": (net, None), "spikingjelly": (spikingjelly_copy(net), functional.reset_net)}
    if args.child:
        model, reset = variants[args.child]
        for _ in range(args.repeats):
            step(model, x, y, reset)
        print(peak_rss_mb())
        return

    with torch.no_grad():  # same spikes from both: a sanity check that they are one network
        a, b = net(x), variants["spikingjelly"][0](x)
        functional.reset_net(variants["spikingjelly"][0])
    if not torch.equal(a, b):
        raise SystemExit("the two variants disagree on the forward pass")
    times = {k: [] for k in variants}
    for name, (model, reset) in variants.items():
        step(model, x, y, reset)  # warm-up (scripting, allocator)
    for _ in range(args.repeats):
        for name, (model, reset) in variants.items():
            t0 = time.perf_counter()
            step(model, x, y, reset)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, (model, reset) in variants.items():
        rows[name] = {"ms_per_step": 1e3 * statistics.median(times[name]),
                      "saved_for_backward_mb": saved_bytes(model, x, y, reset) / 2**20,
                      "peak_rss_mb": child_peak_rss(args, name)}
    ours, sj = rows["ours"], rows["spikingjelly"]
    speedup = sj["ms_per_step"] / ours["ms_per_step"]
    mem_ratio = ours["saved_for_backward_mb"] / sj["saved_for_backward_mb"]
    print(f"6Conv2FC width={args.width} T={args.T} batch={args.batch}, soft masks, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':<14}{'ms/step':>10}{'saved MB':>11}{'peak RSS MB':>13}")
    for name, r in rows.items():
        print(f"{name:<14}{r['ms_per_step']:>10.1f}{r['saved_for_backward_mb']:>11.1f}{r['peak_rss_mb']:>13.0f}")
    print(f"speedup {speedup:.2f}x, activation memory ours/spikingjelly {mem_ratio:.2f}")
    print(json.dumps({"benchmark": "train_step", "width": args.width, "T": args.T, "batch": args.batch,
                      "ours_ms": round(ours["ms_per_step"], 2), "spikingjelly_ms": round(sj["ms_per_step"], 2),
                      "speedup": round(speedup, 3), "ours_saved_mb": round(ours["saved_for_backward_mb"], 2),
                      "spikingjelly_saved_mb": round(sj["saved_for_backward_mb"], 2),
                      "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "spikingjelly_peak_rss_mb":
                      round(sj["peak_rss_mb"])}))


if __name__ == "__main__":
    main()
