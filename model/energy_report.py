"""The energy report (docs/METHOD.md §5, docs/ENERGY.md): per-layer rows of one measured eval
pass, their totals in SOPs, first-layer MACs, synaptic events, spikes, neuron updates, bytes
and pJ under every named hardware model (model/energy_models.py), and the report as JSON, a
terminal table and a plot. The counting that fills it is model/energy_count.py."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from model.atomic import atomic_write
from model.energy_models import BYTES_PER_WORD, COMPONENTS, DEFAULT_MODEL, MODELS, OpModel, energy_model

PJ_PER_SOP = 0.9   # 45 nm accumulate (docs/METHOD.md §5)
PJ_PER_MAC = 4.6   # 45 nm multiply-accumulate, first layer only
REPORT_NAME = "energy_report.json"
# per-sample counts beside SOPs and first-layer MACs, summed in the totals (docs/ENERGY.md)
COUNTS = ("synaptic_events", "graded_events", "input_events", "spikes", "neuron_updates",
          "live_neuron_updates")
# the per-layer fields that are means over samples: what ranks reduce (launcher/train.py)
SAMPLE_MEANS = ("sops_per_sample", "macs_per_sample", "firing_rate", *(f"{k}_per_sample" for k in COUNTS),
                "dense_macs_per_sample")


@dataclass
class LayerReport:
    """One weight layer. Connections are per time step and sample (padding excluded);
    neurons are the layer's post-neurons (its block's neuron mask, or its output features).
    The counts added for the hardware models (docs/ENERGY.md) default to 0 so that a report
    written before them still loads."""

    name: str
    kind: str
    counted: bool
    sops_per_sample: float
    macs_per_sample: float
    firing_rate: float | None
    kept_weights: int
    total_weights: int
    kept_neurons: int
    total_neurons: int
    live_connections: float
    dense_connections: float
    # kept synapses into kept post-neurons out of nonzero inputs, whatever their value
    synaptic_events_per_sample: float = 0.0
    # the part of them whose input is neither 0 nor 1 (SEW sums, pooled averages)
    graded_events_per_sample: float = 0.0
    input_events_per_sample: float = 0.0  # nonzero inputs
    spikes_per_sample: float = 0.0  # emitted by the layer's neurons (after the neuron mask)
    neuron_updates_per_sample: float = 0.0  # dense: every post-neuron at every time step
    live_neuron_updates_per_sample: float = 0.0  # effective: kept post-neurons only
    dense_macs_per_sample: float = 0.0  # the first layer's MACs with every mask kept
    input_elements: int = 0  # one input slice: C x H x W, or the input features
    leaky: bool = False  # its neurons leak (LIF: a multiply per update)

    @property
    def weight_bytes(self) -> int:
        return self.kept_weights * BYTES_PER_WORD

    @property
    def state_bytes(self) -> int:
        """Membrane potentials of the kept post-neurons (layers with a neuron)."""
        return self.kept_neurons * BYTES_PER_WORD if self.neuron_updates_per_sample else 0

    def energy_pj(self, model: str) -> dict[str, float]:
        """This layer's energy per sample under `model`, split into its components."""
        return energy_model(model).layer_pj(self)


@dataclass
class EnergyReport:
    """Per-layer rows and totals of one measured eval pass; totals are derived from the rows
    so that changing `pj_per_sop` / `pj_per_mac` re-prices the same measurement."""

    layers: list[LayerReport]
    samples: int
    weight_keep: float
    neuron_keep: float
    dense_reference_sops: float | None = None
    pj_per_sop: float = PJ_PER_SOP
    pj_per_mac: float = PJ_PER_MAC
    # the dense run's pJ/sample per model, where its report gave them (a finished dense run)
    dense_reference_pj: dict[str, float] | None = None

    @property
    def sops_per_sample(self) -> float:
        return sum(r.sops_per_sample for r in self.layers)

    @property
    def first_layer_macs_per_sample(self) -> float:
        return sum(r.macs_per_sample for r in self.layers)

    @property
    def sop_energy_pj_per_sample(self) -> float:
        return self.pj_per_sop * self.sops_per_sample

    @property
    def energy_pj_per_sample(self) -> float:
        return self.sop_energy_pj_per_sample + self.pj_per_mac * self.first_layer_macs_per_sample

    @property
    def energy_ratio(self) -> float | None:
        """Dense reference SOPs / ours; None without a reference or when we spend no SOPs."""
        if self.dense_reference_sops is None or self.sops_per_sample == 0:
            return None
        return self.dense_reference_sops / self.sops_per_sample

    def total(self, attr: str) -> float:
        return sum(getattr(r, attr) for r in self.layers)

    def model_energy_pj(self, model: str) -> float:
        """Energy per sample under a named model (docs/ENERGY.md)."""
        return energy_model(model).total_pj(self.layers)

    def dense_energy_pj(self, model: str) -> float | None:
        """The dense reference's energy per sample under `model`: its own report's figure, or,
        for a model that prices SOPs, MACs and neuron updates only, its SOPs with this network's
        dense structure (first-layer MACs and neuron updates do not depend on the weights)."""
        if self.dense_reference_pj and model in self.dense_reference_pj:
            return self.dense_reference_pj[model]
        m = energy_model(model)
        if self.dense_reference_sops is None or not isinstance(m, OpModel):
            return None
        return (m.pj_per_sop * self.dense_reference_sops + m.pj_per_mac * self.total("dense_macs_per_sample")
                + m.pj_per_neuron_update * self.total("neuron_updates_per_sample"))

    def model_ratio(self, model: str) -> float | None:
        """Dense reference energy / ours under `model`; None where the dense figure is unknown."""
        dense, ours = self.dense_energy_pj(model), self.model_energy_pj(model)
        return dense / ours if dense is not None and ours > 0 else None

    @property
    def connectivity(self) -> float:
        dense = sum(r.dense_connections for r in self.layers)
        return sum(r.live_connections for r in self.layers) / dense if dense else 1.0

    @property
    def connectivity_pct(self) -> float:
        return 100.0 * self.connectivity

    def totals(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples,
            "sops_per_sample": self.sops_per_sample,
            "first_layer_macs_per_sample": self.first_layer_macs_per_sample,
            "sop_energy_pj_per_sample": self.sop_energy_pj_per_sample,
            "energy_pj_per_sample": self.energy_pj_per_sample,
            "dense_reference_sops": self.dense_reference_sops,
            "energy_ratio": self.energy_ratio,
            "connectivity": self.connectivity,
            "connectivity_pct": self.connectivity_pct,
            "weight_keep": self.weight_keep,
            "neuron_keep": self.neuron_keep,
            "pj_per_sop": self.pj_per_sop,
            "pj_per_mac": self.pj_per_mac,
            **{f"{k}_per_sample": self.total(f"{k}_per_sample") for k in COUNTS},
            "weight_bytes": self.total("weight_bytes"),
            "state_bytes": self.total("state_bytes"),
            **{f"energy_pj_per_sample/{m}": self.model_energy_pj(m) for m in MODELS},
            **{f"energy_ratio/{m}": self.model_ratio(m) for m in MODELS},
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: the totals plus per-layer SOPs and firing rates."""
        out = {k: float(v) for k, v in self.totals().items() if v is not None}
        for r in self.layers:
            if r.counted:
                out[f"sops_per_sample/{r.name}"] = r.sops_per_sample
            if r.firing_rate is not None:
                out[f"firing_rate/{r.name}"] = r.firing_rate
        return out

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the report (a directory gets `energy_report.json`) atomically; return the path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_NAME)
        doc = {**self.totals(), "dense_reference_pj": self.dense_reference_pj,
               "layers": [asdict(r) for r in self.layers]}
        atomic_write(path, json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EnergyReport:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_NAME)
        with open(path) as f:
            doc = json.load(f)
        names = {f.name for f in fields(cls)} - {"layers"}
        return cls(layers=[LayerReport(**r) for r in doc["layers"]],
                   **{k: v for k, v in doc.items() if k in names})

    def table(self) -> str:
        """The report as an aligned terminal table with a totals line and a summary."""
        head = ["layer", "kind", "SOPs/sample", "MACs/sample", "rate", "weights kept",
                "neurons kept", "connections live/dense"]
        rows = [[r.name, r.kind + ("" if r.counted else "*"), si_prefix(r.sops_per_sample),
                 si_prefix(r.macs_per_sample) if r.macs_per_sample else "-",
                 "-" if r.firing_rate is None else f"{r.firing_rate:.4f}",
                 _kept(r.kept_weights, r.total_weights), _kept(r.kept_neurons, r.total_neurons),
                 f"{si_prefix(r.live_connections)}/{si_prefix(r.dense_connections)}"] for r in self.layers]

        def sum_of(attr: str) -> float:
            return sum(getattr(r, attr) for r in self.layers)
        rows.append(["total", "", si_prefix(self.sops_per_sample), si_prefix(self.first_layer_macs_per_sample), "",
                     _kept(sum_of("kept_weights"), sum_of("total_weights")),
                     _kept(sum_of("kept_neurons"), sum_of("total_neurons")),
                     f"{si_prefix(sum_of('live_connections'))}/{si_prefix(sum_of('dense_connections'))}"])
        lines = aligned(head, rows)
        lines[-1:-1] = [lines[1]]  # a rule above the totals line
        lines.append("")
        lines.append(f"energy/sample {si_prefix(self.energy_pj_per_sample)}pJ = "
                     f"{si_prefix(self.sops_per_sample)} SOPs x {self.pj_per_sop} pJ + "
                     f"{si_prefix(self.first_layer_macs_per_sample)} first-layer MACs x {self.pj_per_mac} pJ")
        lines.append(f"connectivity {self.connectivity_pct:.4g} %  weight keep "
                     f"{100 * self.weight_keep:.4g} %  neuron keep {100 * self.neuron_keep:.4g} %  "
                     f"samples {self.samples}")
        if self.energy_ratio is not None:
            lines.append(f"dense reference {si_prefix(self.dense_reference_sops)} SOPs/sample: "
                         f"{self.energy_ratio:.3g}x fewer SOPs")
        lines.append("* not counted in SOPs (first layer: MACs; head: neither)")
        lines += ["", *self.counts_table(), "", *self.models_table()]
        return "\n".join(lines)

    def counts_table(self) -> list[str]:
        """Per layer: what the hardware models price besides SOPs (docs/ENERGY.md)."""
        head = ["layer", "synaptic events", "graded", "spikes out", "neuron updates live/dense",
                f"weights ({BYTES_PER_WORD} B)", f"state ({BYTES_PER_WORD} B)"]

        def cells(name: str, get) -> list[str]:
            return [name, si_prefix(get("synaptic_events_per_sample")), si_prefix(get("graded_events_per_sample")),
                    si_prefix(get("spikes_per_sample")),
                    f"{si_prefix(get('live_neuron_updates_per_sample'))}/{si_prefix(get('neuron_updates_per_sample'))}",
                    si_prefix(get("weight_bytes")) + "B", si_prefix(get("state_bytes")) + "B"]
        rows = [cells(r.name, lambda a, r=r: getattr(r, a)) for r in self.layers]
        rows.append(cells("total", self.total))
        lines = aligned(head, rows, left=1)
        lines[-1:-1] = [lines[1]]
        return lines

    def models_table(self) -> list[str]:
        """Energy per sample under every named model, by component, and the dense ratio."""
        head = ["model", *(f"{c} pJ" for c in COMPONENTS), "total pJ/sample", "dense ratio"]
        rows = []
        for m in MODELS:
            parts = {c: sum(r.energy_pj(m)[c] for r in self.layers) for c in COMPONENTS}
            ratio = self.model_ratio(m)
            rows.append([m + (" (headline)" if m == DEFAULT_MODEL else ""), *(si_prefix(parts[c]) for c in COMPONENTS),
                         si_prefix(self.model_energy_pj(m)), "-" if ratio is None else f"{ratio:.3g}x"])
        return aligned(head, rows, left=1)

    def plot(self, path: str | os.PathLike) -> str:
        """Per-layer bar chart (PNG): SOPs per sample, and kept weights / neurons in %."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [r.name for r in self.layers]
        x = list(range(len(names)))
        fig = Figure(figsize=(max(8.0, 0.4 * len(names) + 2), 11.0))
        FigureCanvasAgg(fig)
        top, bottom, share = fig.subplots(3, 1, gridspec_kw={"height_ratios": (1, 1, 1.1)})
        bottom.sharex(top)
        top.tick_params(axis="x", labelbottom=False)
        top.bar(x, [r.sops_per_sample for r in self.layers], color="tab:blue", label="SOPs / sample")
        if self.first_layer_macs_per_sample:
            top.bar(x, [r.macs_per_sample for r in self.layers], color="tab:red",
                    label="first-layer MACs / sample")
        top.set_ylabel("operations / sample")
        top.set_title(f"{si_prefix(self.sops_per_sample)} SOPs/sample, {si_prefix(self.energy_pj_per_sample)}pJ/sample, "
                      f"connectivity {self.connectivity_pct:.3g} %")
        top.legend(fontsize=8)
        width = 0.4
        bottom.bar([i - width / 2 for i in x], [_pct(r.kept_weights, r.total_weights) for r in self.layers],
                   width, color="tab:green", label="weights kept")
        bottom.bar([i + width / 2 for i in x], [_pct(r.kept_neurons, r.total_neurons) for r in self.layers],
                   width, color="tab:orange", label="neurons kept")
        bottom.set_ylim(0, 105)
        bottom.set_ylabel("kept (%)")
        bottom.legend(fontsize=8)
        bottom.set_xticks(x)
        bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        self._plot_models(share)
        fig.tight_layout()
        path = os.fspath(path)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        return path


    def _plot_models(self, ax) -> None:
        """One bar per named model, stacked by layer: each layer's share of that model's energy."""
        from matplotlib import colormaps

        models = list(MODELS)
        colors = colormaps["tab20"].resampled(max(len(self.layers), 1))
        bottoms = [0.0] * len(models)
        for i, r in enumerate(self.layers):
            shares = [100 * sum(r.energy_pj(m).values()) / (self.model_energy_pj(m) or 1.0) for m in models]
            ax.bar(range(len(models)), shares, bottom=bottoms, color=colors(i), label=r.name)
            bottoms = [b + v for b, v in zip(bottoms, shares)]
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{m}\n{si_prefix(self.model_energy_pj(m))}pJ/sample" for m in models], fontsize=8)
        ax.set_ylabel("share of energy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=6, ncol=max(1, len(self.layers) // 8), loc="upper left", bbox_to_anchor=(1.0, 1.0))


def dense_energies(results: dict) -> dict[str, float] | None:
    """A finished dense run's pJ/sample per model from its results (results.json or its MLflow
    metrics): the keys its report's metrics() wrote; None for a run from before they existed."""
    out = {m: float(results[f"energy_pj_per_sample/{m}"]) for m in MODELS if f"energy_pj_per_sample/{m}" in results}
    return out or None


def aligned(head: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Lines of a text table: header, rule, rows; the first `left` columns left-aligned."""
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), "-" * len(line(head)), *map(line, rows)]


def si_prefix(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


def _pct(kept: int, total: int) -> float:
    return 100.0 * kept / total if total else 100.0


def _kept(kept: int, total: int) -> str:
    return f"{kept}/{total} ({_pct(kept, total):.3g}%)"
