"""EventEngine: a hardened network compiled once, then run event-driven on batches (docs/DEPLOY.md).

    engine = EventEngine(run.net)            # or EventEngine.from_run(open_run(path))
    res = engine.run(x, threads=2)           # x as the run's loader gives it
    res.logits, res.sops_per_sample          # [N, K] class scores, SOPs as the energy report counts

The kernel is CPU (numba); a GPU path would be a second `run_batch` over the same Program
tables (docs/DEPLOY.md, GPU), selected here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch

from deploy.engine_compile import Program, compile_network
from deploy.engine_kernels import run_batch, run_chunk, workspace
from deploy.rundir import DeployError


@dataclass
class EngineResult:
    out: np.ndarray  # [T, N, K] as the network's forward returns it (after the vote)
    logits: np.ndarray  # [N, K], mean over T
    sops: np.ndarray  # [N, counted layers]: synaptic additions per sample, per layer
    layers: list[str]  # names of the sops columns (the energy report's layer names)
    spikes: dict[str, np.ndarray] | None  # block name -> [T, N, C, H, W] uint8, when recorded

    @property
    def sops_per_sample(self) -> float:
        """Mean over the batch, summed over layers as the energy report sums its rows."""
        n = self.sops.shape[0]
        return sum(float(self.sops[:, i].sum()) / n for i in range(self.sops.shape[1]))


class EventEngine:
    def __init__(self, net: torch.nn.Module):
        self.program: Program = compile_network(net)
        self._workspaces: dict[int, tuple[np.ndarray, ...]] = {}  # per thread count
        self._lock = threading.Lock()  # one call at a time owns the workspaces

    @classmethod
    def from_run(cls, run) -> EventEngine:
        """The engine for `deploy.rundir.open_run(...)`'s network (a dense run compiles too)."""
        return cls(run.net)

    @property
    def layers(self) -> list[str]:
        return list(self.program.counted)

    def _input(self, x) -> np.ndarray:
        """[N, input steps, input size], float32 or float64 as given (the kernel reads either
        into float64)."""
        x = x.numpy(force=True) if isinstance(x, torch.Tensor) else np.asarray(x)  # force: detach, to CPU
        shape = self.program.input_shape
        if tuple(x.shape[1:]) != shape:
            raise DeployError(f"input of shape {tuple(x.shape)}: the network takes [N, {', '.join(map(str, shape))}]")
        steps = shape[0] if len(shape) == 4 else 1  # event frames [N, T, C, H, W] or an image
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        return np.ascontiguousarray(x.reshape(x.shape[0], steps, -1), dtype=dtype)

    def run(self, x, *, threads: int | None = None, record: bool = False) -> EngineResult:
        """Class scores, SOP counts and (record) every spiking layer's spikes for one batch."""
        p = self.program
        xin = self._input(x)
        n = xin.shape[0]
        threads = max(1, min(threads or numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS, n))
        groups = p.out_size // p.num_classes if p.vote else 1
        out = np.zeros((n, p.T, p.out_size), np.float64)
        voted = np.empty((p.T, n, p.out_size // groups), np.float64)
        logits = np.empty((n, p.out_size // groups), np.float64)
        sops = np.zeros((n, len(p.counted)), np.float64)
        rec = np.zeros((n, p.T, p.rec_size) if record else (1, 1, 1), np.uint8)
        tables = (*p.tables, out, sops, rec, record, groups, voted, logits)
        with self._lock:
            ws = self._workspaces.get(threads)
            if ws is None:
                a = p.arrays
                ws = self._workspaces[threads] = workspace(a["sizes"], a["maps"].shape[0], threads)
            if threads == 1:  # no thread start for one chunk
                run_chunk(xin, *tables, 0, n, 0, *ws)
            else:
                numba.set_num_threads(threads)
                chunks = (np.arange(threads + 1) * n) // threads
                run_batch(xin, *tables, chunks, *ws)
        spikes = None
        if record:
            spikes = {name: rec[:, :, off:off + int(np.prod(chw))].reshape(n, p.T, *chw).transpose(1, 0, 2, 3, 4)
                      for name, (off, chw) in p.recorded.items()}
        return EngineResult(out=voted, logits=logits, sops=sops, layers=list(p.counted), spikes=spikes)
