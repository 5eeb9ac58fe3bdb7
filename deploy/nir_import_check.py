"""Round trip: a NIR file read by another framework's importer, run step by step, compared
with our network spike for spike (docs/NIR.md, "Round trips").

`python -m deploy.nir_import_check RUN_DIR FILE.nir --framework norse [--limit N]` runs the
run's test split through both and prints one JSON line of counts. Importers are imported
lazily: they are test-only dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass, field

import nir
import torch
import torch.nn as nn

from deploy.nir_graph import DT, NodeMap, static_input

FRAMEWORKS = ("norse", "spikingjelly", "snntorch")


class ImportRejected(RuntimeError):
    """The framework's importer refused the graph; the message is its own reason."""


def _quiet():
    """Importers print banners and warnings per node; keep the check's output readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, logging.NOTSET)
    return stack


class Imported:
    """A graph imported by one framework, stepped one time step per call."""

    def __init__(self, framework: str, graph: nir.NIRGraph):
        if framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {framework!r} (expected one of {FRAMEWORKS})")
        self.framework = framework
        try:
            with _quiet():
                self.module = self._load(framework, graph)
        except Exception as exc:  # the importer's own rule, whatever its exception type
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ImportRejected(f"{framework}: {type(exc).__name__}: {first}") from exc
        self.module.eval()
        self.state = None

    @staticmethod
    def _load(framework: str, graph: nir.NIRGraph) -> nn.Module:
        if framework == "norse":
            import norse.torch

            return norse.torch.from_nir(graph, dt=DT)
        if framework == "spikingjelly":
            from spikingjelly.activation_based.nir_exchange import import_from_nir

            return import_from_nir(graph, dt=DT)
        from snntorch.import_nir import import_from_nir

        return import_from_nir(graph)

    def reset(self) -> None:
        self.state = None
        if self.framework == "snntorch":
            import snntorch

            for m in self.module.modules():
                if isinstance(m, snntorch.Leaky):
                    m.reset_mem()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        with _quiet():
            out = self.module(x, self.state)
        if isinstance(out, tuple):
            out, self.state = out[0], out[1]
        return out

    def submodule(self, node: str) -> nn.Module:
        return self.module.get_submodule(node.replace(".", "_"))


@dataclass
class Comparison:
    framework: str
    samples: int = 0
    neuron_steps_compared: int = 0
    spike_mismatches: int = 0  # (time step, sample, neuron) triples that differ, all nodes
    samples_with_spike_mismatch: int = 0
    output_max_abs_diff: float = 0.0  # graph output vs ours (vote: ours x G)
    top1_mismatches: int = 0  # decide() on our output x G vs on theirs
    top1_ties: int = 0  # samples whose top score is shared by several classes (ours)
    evaluator_disagrees: int = 0  # decide() on ours vs the trainer's topk (only ever on ties)
    top1_correct_ours: int = 0
    top1_correct_theirs: int = 0
    per_node_mismatches: dict = field(default_factory=dict)
    per_node_spikes: dict = field(default_factory=dict)  # our spikes on the compared neurons
    mismatch_samples: list = field(default_factory=list)  # indices in the batch stream (first 20)
    rejected: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _our_pass(net: nn.Module, x: torch.Tensor, modules: dict[str, str]):
    """Our network's output [T, N, K] and the outputs [T, N, ...] of the named modules."""
    named = dict(net.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [named[path].register_forward_hook(lambda m, i, o, p=path: seen.__setitem__(p, o.detach()))
             for path in set(modules.values())]
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _their_pass(imp: Imported, x: torch.Tensor, T: int, static: bool, nodes: list[str]):
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in nodes}

    def hook(name):
        def f(m, i, o):
            seen[name].append((o[0] if isinstance(o, tuple) else o).detach().clone())
        return f

    hooks = [imp.submodule(n).register_forward_hook(hook(n)) for n in nodes]
    outs = []
    imp.reset()
    try:
        with torch.no_grad():
            for t in range(T):
                outs.append(imp.step(x if static else x[:, t]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs), {n: torch.stack(v) for n, v in seen.items()}


def decide(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 of a [T, N, K] output by rate (sum over T), ties to the lowest class index, and
    which samples had a tie. One rule for both sides: the trainer's float mean of k / G
    breaks exact ties by rounding noise, which says nothing about the export."""
    score = out.sum(0)
    best = score.argmax(1)
    ties = (score == score.max(1, keepdim=True).values).sum(1) > 1
    return best, ties


def compare_batch(net: nn.Module, node_map: NodeMap, imp: Imported, x: torch.Tensor, y: torch.Tensor,
                  result: Comparison, vote_groups: int) -> None:
    """Add one batch's counts to `result`: spikes of every spiking node where our neuron is
    kept, the graph output, top-1."""
    T = net.T
    ours_out, ours = _our_pass(net, x, {n: s.module for n, s in node_map.spiking.items()})
    theirs_out, theirs = _their_pass(imp, x, T, static_input(net), list(node_map.spiking))
    bad_samples = torch.zeros(x.shape[0], dtype=torch.bool)
    for name, spec in node_map.spiking.items():
        mine = ours[spec.module]
        if spec.channels is not None:
            mine = mine[:, :, torch.as_tensor(spec.channels)]
        other = theirs[name].reshape(mine.shape)
        cmp = torch.as_tensor(spec.compare).expand_as(mine)
        diff = (mine != other) & cmp
        n_bad = int(diff.sum())
        result.per_node_mismatches[name] = result.per_node_mismatches.get(name, 0) + n_bad
        result.per_node_spikes[name] = result.per_node_spikes.get(name, 0) + int((mine * cmp).sum())
        result.spike_mismatches += n_bad
        result.neuron_steps_compared += int(cmp.sum())
        bad_samples |= diff.flatten(2).any(2).any(0)
    scaled = ours_out * vote_groups
    result.output_max_abs_diff = max(result.output_max_abs_diff,
                                     float((scaled - theirs_out.reshape(scaled.shape)).abs().max()))
    top_ours, ties = decide(scaled)
    top_theirs, _ = decide(theirs_out.reshape(scaled.shape))
    result.top1_mismatches += int((top_ours != top_theirs).sum())
    result.top1_ties += int(ties.sum())
    result.evaluator_disagrees += int((net.logits(ours_out).topk(1, dim=1).indices[:, 0] != top_ours).sum())
    result.top1_correct_ours += int((top_ours == y).sum())
    result.top1_correct_theirs += int((top_theirs == y).sum())
    result.samples_with_spike_mismatch += int(bad_samples.sum())
    result.mismatch_samples += [result.samples + int(i) for i in torch.nonzero(bad_samples).flatten()][:20]
    result.samples += x.shape[0]


def vote_groups(graph: nir.NIRGraph) -> int:
    """G of the vote node (its ones per row), 1 for nets whose output is not a vote."""
    vote = graph.nodes.get("vote")
    return int(vote.weight.sum(1)[0]) if vote is not None else 1


def compare(net: nn.Module, graph: nir.NIRGraph, node_map: NodeMap, framework: str, batches) -> Comparison:
    """Run `batches` of (x, y) through our net and `framework`'s import of `graph`."""
    result = Comparison(framework)
    try:
        imp = Imported(framework, graph)
    except ImportRejected as exc:
        result.rejected = str(exc)
        return result
    g = vote_groups(graph)
    try:
        for x, y in batches:
            compare_batch(net, node_map, imp, x, y, result, g)
    except Exception as exc:  # an importer that accepted the graph but cannot run it
        result.rejected = f"{framework}: runs but fails: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return result


def main(argv: list[str] | None = None) -> int:
    from deploy.nir_graph import build_graph
    from deploy.rundir import DeployError, open_run

    ap = argparse.ArgumentParser(prog="python -m deploy.nir_import_check", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("nir_file", help="the file deploy.export wrote (its encoding options are read from it)")
    ap.add_argument("--framework", choices=FRAMEWORKS, required=True)
    ap.add_argument("--limit", type=int, default=None, help="at most this many test batches")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args(argv)
    try:
        run = open_run(args.run_dir)
        graph = nir.read(args.nir_file)
        meta = graph.metadata
        enc = {k: (meta[k].decode() if isinstance(meta[k], bytes) else str(meta[k]))
               for k in ("maxpool", "avgpool", "firing", "neuron_masks") if k in meta}
        _, node_map = build_graph(run.net, model_name=run.cfg.model.name, **enc)
        loader = run.loader("test", args.batch_size)
    except (DeployError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    batches = (b for i, b in enumerate(loader) if args.limit is None or i < args.limit)
    torch.set_grad_enabled(False)
    print(json.dumps(compare(run.net, graph, node_map, args.framework, batches).to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
