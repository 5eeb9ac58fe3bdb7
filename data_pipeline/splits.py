"""From a source dataset to split files: seeded validation carving and crash-safe .beton writes.

Every writer (images and DVS) goes through here so that all of them share the same rules:
the validation split is a seeded draw out of train, an existing output is never replaced
without ``overwrite``, and a .beton only ever appears under its final name once complete.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from data_pipeline import DataError
from model.atomic import atomic_path, atomic_write

SPLITS = ("train", "val", "test")


def carve_val(n: int, val_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train_idx, val_idx), both sorted int64 and disjoint.

    ``val_size`` is a sample count (int >= 1) or a fraction of n (float in (0, 1)).
    The same (n, val_size, seed) always gives the same split, so a rewrite of the dataset
    keeps the model selection honest across runs.
    """
    if isinstance(val_size, float) and 0 < val_size < 1:
        k = max(1, round(val_size * n))
    elif float(val_size) == int(val_size) and int(val_size) >= 1:
        k = int(val_size)
    else:
        raise DataError(f"val_size={val_size!r}: give a count >= 1 or a fraction in (0, 1)")
    if k >= n:
        raise DataError(f"val_size={val_size!r} takes {k} of {n} training samples; none left to train on")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]).astype(np.int64), np.sort(order[:k]).astype(np.int64)


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work starts if an output exists and may not be replaced."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise DataError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")


@contextmanager
def atomic_beton(out_path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out_path``; rename it to ``out_path`` only on success.

    A crash or an exception leaves no file under the final name (and removes the temporary
    one), so a loader never sees a half-written .beton.
    """
    out_path = Path(out_path)
    refuse_existing([out_path], overwrite)
    with atomic_path(out_path) as tmp:
        yield tmp


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON via a temporary file and a rename."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


class _Guarded:
    """Dataset wrapper for FFCV's writer processes.

    FFCV's writer waits forever for a sample whose worker died, so a read error must not
    escape a worker: it is appended to ``errors_path`` and the template sample is written in
    its place; ``write_beton`` then discards the file and reports the errors.
    """

    def __init__(self, dataset, template, errors_path: Path):
        self.dataset, self.template, self.errors_path = dataset, template, errors_path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except Exception as err:  # any failure here would hang the writer
            with open(self.errors_path, "a") as f:
                f.write(f"{str(err).splitlines()[0] if str(err) else type(err).__name__}\n")
            return self.template


def _chunksize(n: int, num_workers: int) -> int:
    # FFCV's default of 100 samples per queue item makes small raw images queue-bound;
    # 4 chunks per worker keeps the load balanced.
    return max(1, min(1000, math.ceil(n / (4 * num_workers))))


def write_beton(out_path: str | os.PathLike, dataset, fields: Mapping, *,
                indices: Sequence[int] | None = None, num_workers: int = 1,
                overwrite: bool = False, max_sample_bytes: int = 0) -> int:
    """Write ``dataset[i] for i in indices`` (in that order) to ``out_path`` atomically.

    ``dataset[i]`` returns one value per field, in the order of ``fields`` (e.g. an HxWx3
    uint8 image and an int label). ``max_sample_bytes``: a bound on one stored sample; pages
    grow to hold it (FFCV's writer hangs on a sample larger than its 8 MiB default page).
    Returns the number of samples written. Any sample that fails to read aborts the write
    with a DataError naming the first failures.
    """
    import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise DataError(f"{out_path}: no samples to write")
    num_workers = max(1, num_workers)
    with atomic_beton(out_path, overwrite) as tmp:
        errors_path = tmp.with_name(tmp.name + ".errors")
        try:
            template = dataset[int(indices[0])]
            page_size = max(4 * MIN_PAGE_SIZE, 1 << max(0, max_sample_bytes - 1).bit_length())
            writer = DatasetWriter(str(tmp), dict(fields), page_size=page_size, num_workers=num_workers)
            writer.from_indexed_dataset(_Guarded(dataset, template, errors_path), indices=indices.tolist(),
                                        chunksize=_chunksize(len(indices), num_workers))
            if errors_path.exists():
                errors = errors_path.read_text().splitlines()
                shown = "; ".join(errors[:3])
                raise DataError(f"{out_path}: {len(errors)} sample(s) could not be read: {shown}")
        finally:
            errors_path.unlink(missing_ok=True)
    return len(indices)
