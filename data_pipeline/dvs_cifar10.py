"""CIFAR10-DVS: event recordings -> [T, 2, 128, 128] count frames in .beton -> [N, T, 2, S, S] batches.

Source layout (SpikingJelly's `extract/` or tonic's `CIFAR10DVS/` folder): one folder per class,
`airplane/ automobile/ ... truck/`, of `.aedat` (jAER AEDAT 2.0, the original release) or
`.aedat4` recordings. As the reference does (SpikingJelly frames, its DatasetSplitter), each
class's recordings in sorted file-name order give the first 90 % to train and the rest to test,
and every recording becomes T frames of equal event number. We also carve a seeded val split out
of train. Frames are stored as exact int16 counts; the loader resizes them to S x S (bilinear,
antialiased, as the reference's `transforms.Resize(48)`) and augments train batches
(`data_pipeline.loaders.dvs_loaders`, `data_pipeline.event_augment`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import DataError
from .events import DVS128_SIZE, EVENT_SUFFIXES, events_to_frames, read_events
from .splits import SPLITS, carve_val, refuse_existing, write_beton, write_json_atomic

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
SOURCE_HINT = ("CIFAR10-DVS is in no package registry: download it from "
               "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671 and extract the "
               "class archives so that SRC holds airplane/ ... truck/")
_INT16_MAX = np.iinfo(np.int16).max


def find_recordings(src: Path) -> list[list[Path]]:
    """Per class (CLASS_NAMES order), its recordings in sorted file-name order."""
    if not src.is_dir():
        raise DataError(f"{src}: no such folder. {SOURCE_HINT}")
    missing = [name for name in CLASS_NAMES if not (src / name).is_dir()]
    if missing:
        raise DataError(f"{src}: missing class folder(s) {', '.join(missing)}. {SOURCE_HINT}")
    per_class = [sorted(p for p in (src / name).iterdir() if p.suffix in EVENT_SUFFIXES)
                 for name in CLASS_NAMES]
    for name, files in zip(CLASS_NAMES, per_class):
        if not files:
            raise DataError(f"{src / name}: no {' or '.join(EVENT_SUFFIXES)} recordings")
    suffixes = {p.suffix for files in per_class for p in files}
    if len(suffixes) > 1:
        # The two releases may differ in axis orientation; a mixed tree would mix them.
        raise DataError(f"{src}: holds both .aedat and .aedat4 recordings; use one release")
    return per_class


def split_train_test(per_class: list[list[Path]], train_fraction: float
                     ) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """First int(n * train_fraction) recordings of each class to train, the rest to test."""
    train, test = [], []
    for label, files in enumerate(per_class):
        n_train = int(len(files) * train_fraction)
        if not 0 < n_train < len(files):
            raise DataError(f"{files[0].parent}: {len(files)} recording(s) cannot be split "
                            f"{train_fraction:g} / {1 - train_fraction:g} into train and test")
        train += [(path, label) for path in files[:n_train]]
        test += [(path, label) for path in files[n_train:]]
    return train, test


class _Recordings:
    """Indexable (frames int16 [T, 2, 128, 128], label) for FFCV's writer processes."""

    def __init__(self, samples: list[tuple[Path, int]], T: int):
        self.samples, self.T = samples, T

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        events, sensor_size = read_events(path)
        if sensor_size != DVS128_SIZE:
            raise DataError(f"{path}: sensor is {sensor_size[1]}x{sensor_size[0]}, "
                            f"CIFAR10-DVS recordings are 128x128")
        if len(events) == 0:
            raise DataError(f"{path}: recording holds no events")
        frames = events_to_frames(events, self.T, DVS128_SIZE)
        if frames.max() > _INT16_MAX:
            raise DataError(f"{path}: a pixel counts {int(frames.max())} events in one frame, "
                            f"more than int16 storage holds")
        return frames.astype(np.int16), label


def write_dvs_cifar10(src, out_dir, *, T: int = 10, val_size: int | float = 1000, seed: int = 0,
                      overwrite: bool = False, num_workers: int = 1,
                      train_fraction: float = 0.9) -> dict:
    """Write out_dir/{train,val,test}.beton (fields `frames`, `label`) and meta.json; returns meta.

    val_size: a count or a fraction of the train split, drawn with `seed` (see carve_val).
    """
    import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
    from ffcv.fields import IntField, NDArrayField

    src, out_dir = Path(src), Path(out_dir)
    outputs = [out_dir / f"{split}.beton" for split in SPLITS] + [out_dir / "meta.json"]
    refuse_existing(outputs, overwrite)
    if T < 1:
        raise DataError(f"T={T}: need at least one frame per recording")
    train, test = split_train_test(find_recordings(src), train_fraction)
    train_idx, val_idx = carve_val(len(train), val_size, seed)
    splits = {"train": [train[i] for i in train_idx], "val": [train[i] for i in val_idx],
              "test": test}
    fields = {"frames": NDArrayField(np.dtype("int16"), (T, 2, *DVS128_SIZE)),
              "label": IntField()}
    for split, samples in splits.items():
        write_beton(out_dir / f"{split}.beton", _Recordings(samples, T), fields,
                    num_workers=num_workers, overwrite=overwrite)
    meta = {
        "dataset": "dvs_cifar10",
        "source": str(src.resolve()),
        "classes": list(CLASS_NAMES),
        "num_classes": len(CLASS_NAMES),
        "counts": {split: len(samples) for split, samples in splits.items()},
        "val": {"size": val_size, "seed": seed, "carved_from": "train"},
        "train_fraction": train_fraction,
        "T": T,
        "frames": {"field": "frames", "dtype": "int16", "shape": [T, 2, *DVS128_SIZE],
                   "channels": ["off", "on"], "split_by": "number",
                   "values": "event counts per pixel"},
        # Written order = sequential loader order; lets anyone trace a sample to its recording.
        "files": {split: [path.relative_to(src).as_posix() for path, _ in samples]
                  for split, samples in splits.items()},
    }
    write_json_atomic(out_dir / "meta.json", meta)
    counts = ", ".join(f"{split} {n:,}" for split, n in meta["counts"].items())
    print(f"dvs_cifar10: {counts} samples, {len(CLASS_NAMES)} classes, T={T} -> {out_dir}")
    return meta
