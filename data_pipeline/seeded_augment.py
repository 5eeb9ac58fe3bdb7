"""CIFAR-style augmentation (random crop with padding + horizontal flip) that is reproducible.

FFCV's RandomTranslate / RandomHorizontalFlip draw from numba's per-thread RNG, which is seeded
from the OS: two runs over the same order see different crops, so a resumed run could never
equal an uninterrupted one. Here each sample's draw is a hash of (seed, its index, the index
that opens its batch): fixed for a given epoch order (itself seeded by FFCV from seed + epoch),
different from epoch to epoch, independent of threads and of where a run was resumed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class SeededCropFlip(Operation):
    """uint8 [N, H, W, C]: shift by up to `padding` pixels (zero fill) and flip with p = 1/2."""

    def __init__(self, padding: int = 4, seed: int = 0):
        super().__init__()
        self.padding, self.seed = padding, seed

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return (replace(previous_state, jit_mode=True),
                AllocationQuery(previous_state.shape, previous_state.dtype))

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad = self.padding
        span = np.uint64(2 * pad + 1)
        seed = np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF)
        k_idx, k_first = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
        m1, m2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
        s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)
        s8, s16, one = np.uint64(8), np.uint64(16), np.uint64(1)

        def crop_flip(images, dst, indices):
            n, h, w, c = images.shape
            first = np.uint64(indices[0])
            for i in my_range(n):
                z = seed + np.uint64(indices[i]) * k_idx + first * k_first
                z = (z ^ (z >> s30)) * m1  # splitmix64 finaliser
                z = (z ^ (z >> s27)) * m2
                z = z ^ (z >> s31)
                dy = np.int64(z % span) - pad
                dx = np.int64((z >> s8) % span) - pad
                flip = ((z >> s16) & one) == one
                for y in range(h):
                    sy = y + dy
                    for x in range(w):
                        sx = (w - 1 - x if flip else x) + dx
                        if 0 <= sy < h and 0 <= sx < w:
                            for k in range(c):
                                dst[i, y, x, k] = images[i, sy, sx, k]
                        else:
                            for k in range(c):
                                dst[i, y, x, k] = 0
            return dst[:n]

        crop_flip.is_parallel = True
        crop_flip.with_indices = True
        return crop_flip
