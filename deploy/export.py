"""`python -m deploy.export RUN_DIR --format nir --out FILE.nir`: the run's reported network
(docs/NIR.md) as a file other simulators and chips read. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.rundir import DeployError, open_run
from model.atomic import atomic_path

FORMATS = ("nir",)


def run_metadata(run) -> dict:
    """Informative only (no importer reads it): where the network comes from and what it costs."""
    e = {**run.results, **run.energy}
    meta = {"run_dir": str(run.path.resolve()), "pruned": bool(run.pruned),
            "input_encoding": ("the same image at each of the T steps (direct encoding: the first "
                               "conv + BN is the first node, fed the image every step)"
                               if run.cfg.data.dataset != "dvs_cifar10" else "event frame t at step t")}
    for key in ("test_top1", "sops_per_sample", "connectivity", "weight_keep", "neuron_keep",
                "first_layer_macs_per_sample", "energy_pj_per_sample", "test_samples"):
        if e.get(key) is not None:
            meta[key] = float(e[key])
    return meta


def export_nir(run_dir, out, *, maxpool: str = "sum", avgpool: str = "sum", firing: str = "gt",
               neuron_masks: str = "threshold") -> Path:
    """Write the run's network to `out` as NIR (HDF5); the file is complete or absent."""
    import nir

    from deploy.nir_graph import NIRExportError, build_graph

    out = Path(out)
    if out.is_dir():
        raise DeployError(f"{out}: is a directory, not an output file")
    if not out.parent.is_dir():
        raise DeployError(f"{out}: cannot write: no directory {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise DeployError(f"{out}: cannot write: {out.parent} is not writable")
    run = open_run(run_dir)
    try:
        graph, _ = build_graph(run.net, model_name=run.cfg.model.name, metadata=run_metadata(run),
                               maxpool=maxpool, avgpool=avgpool, firing=firing, neuron_masks=neuron_masks)
    except NIRExportError as exc:
        raise DeployError(f"{run.path}: {exc}") from None
    try:
        with atomic_path(out) as tmp:
            nir.write(tmp, graph)
    except OSError as exc:
        raise DeployError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    ap.add_argument("--out", required=True, help="output file")
    ap.add_argument("--maxpool", default="sum", choices=("sum", "conv"),
                    help="max-pool of spikes as SumPool2d (default) or a one-hot Conv2d, then an OR neuron")
    ap.add_argument("--avgpool", default="sum", choices=("sum", "avg"),
                    help="average pool as SumPool2d with 1/k^2 in the next weights (default) or AvgPool2d")
    ap.add_argument("--firing", default="gt", choices=("gt", "ge"),
                    help="thresholds for NIR's v > theta (default) or for simulators firing at v >= theta")
    ap.add_argument("--neuron-masks", default="threshold", choices=("threshold", "unroll"),
                    help="masked neurons under convs as +inf thresholds (default, compact) or, for "
                         "importers that demand uniform thresholds, zero outgoing weights in unrolled "
                         "convs (large: see docs/NIR.md)")
    args = ap.parse_args(argv)
    if args.format not in FORMATS:
        print(f"error: unknown format {args.format!r} (supported: {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    try:
        out = export_nir(args.run_dir, args.out, maxpool=args.maxpool, avgpool=args.avgpool,
                         firing=args.firing, neuron_masks=args.neuron_masks)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
