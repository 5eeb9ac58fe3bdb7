"""Named hardware energy models that price one measured eval pass (docs/ENERGY.md).

Every model prices the counts of an `EnergyReport` (model/energy_report.py) per sample; the
constants and their sources are in docs/ENERGY.md. `horowitz45` is the paper's (0.9 pJ per
SOP, 4.6 pJ per first-layer MAC) and stays the headline; the others add what the paper leaves
out: neuron updates (`loihi`, `spinnaker2`) and memory traffic (`lemaire`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.energy_report import LayerReport

BYTES_PER_WORD = 4      # weights, membrane potentials and spike messages: 32-bit words
FIFO_WORDS = 1000       # Lemaire et al.'s spike FIFO between layers, in messages
COMPONENTS = ("synaptic", "mac", "neuron", "memory")


@dataclass(frozen=True)
class OpModel:
    """pJ per SOP, per first-layer MAC and per live-neuron update (one neuron, one time step)."""

    name: str
    pj_per_sop: float
    pj_per_mac: float
    pj_per_neuron_update: float

    def layer_pj(self, row: LayerReport) -> dict[str, float]:
        """One layer's energy per sample, split into COMPONENTS."""
        return {"synaptic": self.pj_per_sop * row.sops_per_sample, "mac": self.pj_per_mac * row.macs_per_sample,
                "neuron": self.pj_per_neuron_update * row.live_neuron_updates_per_sample, "memory": 0.0}

    def total_pj(self, rows: list[LayerReport]) -> float:
        """Priced on the totals, so that `horowitz45` repeats the paper's sum bit for bit."""
        return (self.pj_per_sop * sum(r.sops_per_sample for r in rows)
                + self.pj_per_mac * sum(r.macs_per_sample for r in rows)
                + self.pj_per_neuron_update * sum(r.live_neuron_updates_per_sample for r in rows))


def memory_pj_per_byte(capacity_bytes: float) -> float:
    """Lemaire et al.'s SRAM access cost by buffer size: piecewise linear through 10 / 20 /
    100 pJ per 32-bit access at 8 KiB / 32 KiB / 1 MiB, constant above (docs/ENERGY.md)."""
    points = ((0.0, 0.0), (8 * 1024.0, 10.0 / 4), (32 * 1024.0, 20.0 / 4), (1024 * 1024.0, 100.0 / 4))
    c = min(max(capacity_bytes, 0.0), points[-1][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if c <= x1:
            return y0 + (y1 - y0) * (c - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True)
class MemoryModel:
    """Lemaire et al. 2022 on our exact counts: 32-bit adds and multiplies, addressing, and
    every SRAM access priced by the size of the buffer it reads (docs/ENERGY.md)."""

    name: str
    pj_add: float
    pj_mul: float

    def layer_pj(self, row: LayerReport) -> dict[str, float]:
        add, mac, w = self.pj_add, self.pj_mul + self.pj_add, BYTES_PER_WORD
        fifo = memory_pj_per_byte(FIFO_WORDS * w)
        weights = memory_pj_per_byte(row.kept_weights * w)
        state = memory_pj_per_byte(row.kept_neurons * w)
        events, graded = row.synaptic_events_per_sample, row.graded_events_per_sample
        # a graded input (a SEW sum, a pooled average) is one multiply-accumulate per synapse
        synaptic = (events - graded) * add + graded * mac
        synaptic += events * add + (2 * row.input_events_per_sample * mac if row.kind != "fc" else 0.0)
        memory = (row.input_events_per_sample * w * fifo            # read the input spikes
                  + events * w * weights                            # read one weight per event
                  + 2 * events * w * state                          # read + write the potential
                  + 2 * row.live_neuron_updates_per_sample * w * state  # leak / fire / reset
                  + row.spikes_per_sample * w * fifo)               # write the output spikes
        if row.macs_per_sample:  # a dense layer on pixels: one input and one weight read per MAC
            memory += row.macs_per_sample * w * (memory_pj_per_byte(row.input_elements * w) + weights)
        neuron = row.live_neuron_updates_per_sample * (mac if row.leaky else add) + row.spikes_per_sample * add
        return {"synaptic": synaptic, "mac": row.macs_per_sample * mac, "neuron": neuron, "memory": memory}

    def total_pj(self, rows: list[LayerReport]) -> float:
        return sum(sum(self.layer_pj(r).values()) for r in rows)


MODELS: dict[str, OpModel | MemoryModel] = {m.name: m for m in (
    OpModel("horowitz45", pj_per_sop=0.9, pj_per_mac=4.6, pj_per_neuron_update=0.0),
    OpModel("loihi", pj_per_sop=27.1, pj_per_mac=4.6, pj_per_neuron_update=81.0),  # 23.6 + 3.5
    OpModel("spinnaker2", pj_per_sop=450.0, pj_per_mac=4.6, pj_per_neuron_update=2190.0),
    MemoryModel("lemaire", pj_add=0.1, pj_mul=3.1),
)}
DEFAULT_MODEL = "horowitz45"


def energy_model(name: str) -> OpModel | MemoryModel:
    """The model called `name`; a ValueError naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown energy model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]
