"""Structure of a network by name: sizes, prunable logits, dense connections, penalty scales.

    python -m model.summary --model cifar10_6conv2fc [--width 0.25] [--num-classes 10]
                            [--input-size 32] [--json]

Bad input (unknown model, a width that leaves no channel, an input too small for the
topology) is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.nn as nn

from model.energy_count import layer_kind
from model.energy_report import aligned
from model.masks import MaskedConv2d, NeuronMask, mask_mode, masked_modules, weight_layers
from model.penalty import penalty_terms
from model.registry import MODELS, build_model
from model.structure import structural_pass


def default_num_classes(name: str) -> int:
    """The paper's class count: ImageNet for the SEW-ResNets, CIFAR-10 / DVS-CIFAR10 otherwise."""
    return 1000 if name.startswith("sew_resnet") else 10


def structure_summary(net: nn.Module) -> dict:
    """Global sizes and one row per weight layer; dense connections are per time step and
    sample with every mask off and padding excluded (docs/METHOD.md §5). Mask modes are restored."""
    with mask_mode(net, "off"):
        dense = structural_pass(net)
    terms = penalty_terms(net)
    e_w = {id(m): e for m, e in terms.weights}
    e_n = {id(m): e for m, e in terms.neurons}
    owners = {child: mod for mod in net.modules() for child in mod.children()}
    rows = []
    for name, layer in weight_layers(net):
        nmask = getattr(owners[layer], "nmask", None)
        if isinstance(layer, MaskedConv2d):
            shape_in = (layer.in_channels, *layer.in_hw)
            shape_out = (layer.out_channels, *layer.out_hw)
        else:
            shape_in, shape_out = (layer.in_features,), (layer.out_features,)
        rows.append({
            "name": name, "kind": layer_kind(layer), "input": list(shape_in), "output": list(shape_out),
            "weights": layer.weight.numel(), "weight_mask": layer.logits is not None,
            "neuron_mask": nmask is not None and nmask.logits is not None, "counted": layer.counted,
            "e_w": e_w.get(id(layer)), "e_n": e_n.get(id(nmask)) if nmask is not None else None,
            "dense_connections": int(dense[name]),
        })
    masks = [m for _, m in masked_modules(net) if m.logits is not None]
    return {
        "weights": sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
        "prunable_weights": sum(m.logits.numel() for m in masks if not isinstance(m, NeuronMask)),
        "prunable_neurons": sum(m.logits.numel() for m in masks if isinstance(m, NeuronMask)),
        "dense_connections_per_step": int(sum(dense.values())),
        "penalty_coefficient_sums": terms.sums(),
        "layers": rows,
    }


def _table(summary: dict) -> str:
    head = ["layer", "kind", "input", "output", "weights", "masks", "e_w", "e_n", "dense conn."]
    fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
    rows = [[r["name"], r["kind"], "x".join(map(str, r["input"])), "x".join(map(str, r["output"])),
             f"{r['weights']:,}", ("w" if r["weight_mask"] else "") + ("n" if r["neuron_mask"] else "") or "-",
             fmt(r["e_w"]), fmt(r["e_n"]), f"{r['dense_connections']:,}"] for r in summary["layers"]]
    sums = summary["penalty_coefficient_sums"]
    return "\n".join([
        *aligned(head, rows), "",
        f"weights                     {summary['weights']:,}",
        f"prunable_weights            {summary['prunable_weights']:,}",
        f"prunable_neurons            {summary['prunable_neurons']:,}",
        f"dense_connections_per_step  {summary['dense_connections_per_step']:,}",
        f"penalty_coefficient_sums    weights {sums['weights']:.6g}  neurons {sums['neurons']:.6g}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    num_classes = args.num_classes if args.num_classes is not None else default_num_classes(args.model)
    try:
        net = build_model(args.model, num_classes=num_classes, width=args.width, input_size=args.input_size)
        summary = structure_summary(net)
    except (ValueError, RuntimeError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    summary = {"model": args.model, "width": args.width, "num_classes": num_classes, "T": net.T,
               "input_shape": list(net.input_shape), **summary}
    print(json.dumps(summary) if args.json else _table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
