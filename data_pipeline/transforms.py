"""FFCV pipeline operations we need and FFCV does not ship in a usable form."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class NormalizeToCHW(Operation):
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] contiguous, ``(x - mean) / std``, in one pass.

    FFCV's ``NormalizeImage`` keeps [N, H, W, C] (then ``ToTorchImage`` gives a channels-last
    view on which ``.view`` fails, or a second copy) and needs cupy on CUDA. This one is a
    compiled table lookup on the CPU, parallel over images; on CUDA, ``ToDevice`` follows it.
    ``mean`` and ``std`` are per channel on the 0-255 scale.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        self.table = ((np.arange(256)[:, None] - mean[None, :]) / std[None, :]).astype(np.float32)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        h, w, c = previous_state.shape
        return (replace(previous_state, jit_mode=True, shape=(c, h, w), dtype=np.dtype(np.float32)),
                AllocationQuery((c, h, w), np.dtype(np.float32)))

    def generate_code(self) -> Callable:
        table = self.table
        my_range = Compiler.get_iterator()

        def normalize(images, dst):
            n, h, w, c = images.shape
            for i in my_range(n):
                for k in range(c):
                    for y in range(h):
                        for x in range(w):
                            dst[i, k, y, x] = table[images[i, y, x, k], k]
            return dst[:n]

        normalize.is_parallel = True
        return normalize
