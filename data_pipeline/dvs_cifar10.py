"""CIFAR10-DVS: event recordings -> [T, 2, 128, 128] count frames in .beton -> [N, T, 2, S, S] batches.

Source layout (SpikingJelly's `extract/` or tonic's `CIFAR10DVS/` folder): one folder per class,
`airplane/ automobile/ ... truck/`, of `.aedat` (jAER AEDAT 2.0, the original release) or
`.aedat4` recordings. As the reference does (SpikingJelly frames, its DatasetSplitter), each
class's recordings in sorted file-name order give the first 90 % to train and the rest to test,
and every recording becomes T frames of equal event number. We also carve a seeded val split out
of train. Frames are stored as exact int16 counts; the loader resizes them to S x S (bilinear,
antialiased, as the reference's `transforms.Resize(48)`) and augments train batches.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


_ROLL_MAX = 5 / 48  # reference NDA (M=1, N=2) at 48x48: roll <= 5 px, rotate <= 30 deg, cutout 1/3
_ROTATE_MAX_DEG = 30.0
_CUTOUT_RATIO = 1 / 3


def nda_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reference NDA augmentation of a batch x [N, T, 2, H, W], one draw per sample for all T.

    Horizontal flip with p=0.5, then one of: roll both axes by up to 5/48 of the size, rotate
    by up to 30 degrees (nearest, zero fill), or zero a square 1/3 the size at a random centre.
    """
    n, T, C, H, W = x.shape
    out = x.reshape(n, T * C, H, W)

    def rand(*shape):  # drawn on the CPU generator so a run is reproducible on any device
        return torch.rand(shape, generator=generator).to(x.device)

    flip = rand(n) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    op = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    out = torch.where((op == 0)[:, None, None, None], _roll(out, rand(n, 2)), out)
    out = torch.where((op == 1)[:, None, None, None], _rotate(out, rand(n)), out)
    out = torch.where((op == 2)[:, None, None, None], _cutout(out, rand(n, 2)), out)
    return out.reshape(n, T, C, H, W)


def _roll(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """torch.roll of each sample by its own integer shifts in [-k, k], k = _ROLL_MAX * size."""
    n, _, H, W = x.shape
    k = round(_ROLL_MAX * H)
    shift = (u * (2 * k + 1)).floor().long() - k  # uniform over -k..k, as random.randint
    rows = (torch.arange(H, device=x.device) - shift[:, :1]) % H
    cols = (torch.arange(W, device=x.device) - shift[:, 1:]) % W
    x = x.gather(2, rows[:, None, :, None].expand_as(x))
    return x.gather(3, cols[:, None, None, :].expand_as(x))


def _rotate(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about its centre by an angle uniform in [-30, 30] degrees.

    Same sampling matrix as torchvision's rotate (nearest, fill 0), written in grid_sample's
    normalised coordinates, hence the aspect-ratio factors.
    """
    n, _, H, W = x.shape
    angle = torch.deg2rad((2 * u - 1) * _ROTATE_MAX_DEG)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin * H / W, zero], 1),
                         torch.stack([sin * W / H, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Zero rows [cy - h/2, cy + h/2) x cols [cx - w/2, cx + w/2) (clipped), h = H/3, w = W/3."""
    n, _, H, W = x.shape
    cy, cx = (u[:, 0] * H).floor().long(), (u[:, 1] * W).floor().long()
    half_h, half_w = int(_CUTOUT_RATIO * H) // 2, int(_CUTOUT_RATIO * W) // 2
    rows = torch.arange(H, device=x.device)[None, :]
    cols = torch.arange(W, device=x.device)[None, :]
    in_rows = (rows >= cy[:, None] - half_h) & (rows < cy[:, None] + half_h)
    in_cols = (cols >= cx[:, None] - half_w) & (cols < cx[:, None] + half_w)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(hole[:, None], 0)


def _frames_op(image_size: int, augment: bool, seed: int, rank: int):
    """FFCV operation on the decoded batch: int16 counts -> float32 [N, T, 2, S, S], augmented."""
    from ffcv.pipeline.operation import Operation

    class FramesToInput(Operation):
        def __init__(self):
            super().__init__()
            state = np.random.SeedSequence([seed, rank]).generate_state(1)[0]
            self.generator = torch.Generator().manual_seed(int(state))

        def generate_code(self):
            generator = self.generator

            def frames_to_input(inp, _):
                x = inp.float()
                n, T, C, H, W = x.shape
                if (H, W) != (image_size, image_size):
                    x = F.interpolate(x.reshape(n, T * C, H, W), size=(image_size, image_size),
                                      mode="bilinear", align_corners=False, antialias=True)
                    x = x.reshape(n, T, C, image_size, image_size)
                return nda_augment(x, generator) if augment else x

            return frames_to_input

        def declare_state_and_memory(self, previous_state):
            T, C = previous_state.shape[:2]
            return replace(previous_state, shape=(T, C, image_size, image_size),
                           dtype=torch.float32, jit_mode=False), None

    return FramesToInput()


def dvs_loaders(data_dir, *, batch_size: int, num_workers: int = 1, order: str = "random",
                os_cache: bool = True, drop_last: bool | None = None, distributed: bool = False,
                device="cpu", seed: int = 0, image_size: int = 48, augment: bool = True) -> dict:
    """FFCV loaders for the .beton splits present in data_dir: {"train", "val", "test"}.

    Batches are (x float32 [N, T, 2, image_size, image_size] event counts, y int64 [N]).
    Train follows `order` and is augmented (NDA) unless augment=False; val and test are read
    in sequence. Ordering, drop_last and sharding are those of `loaders.build_loader`; with
    distributed, each rank also augments with its own seed.
    """
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    from .inspect import open_beton
    from .loaders import build_loader, check_options

    data_dir = Path(data_dir)
    device = check_options(order, distributed, device)
    rank = torch.distributed.get_rank() if distributed else 0
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loaders = {}
    for split in SPLITS:
        path = data_dir / f"{split}.beton"
        if not path.is_file():
            continue
        fields = list(open_beton(path).handlers)
        if fields != ["frames", "label"]:
            raise DataError(f"{path}: not a dvs_cifar10 .beton (fields {', '.join(fields)})")
        train = split == "train"
        pipelines = {
            "frames": [NDArrayDecoder(), ToTensor(), *to_device,
                       _frames_op(image_size, augment and train, seed, rank)],
            "label": [IntDecoder(), ToTensor(), *to_device, Squeeze(1)],
        }
        loaders[split] = build_loader(path, pipelines, train=train, batch_size=batch_size,
                                      num_workers=num_workers, order=order, os_cache=os_cache,
                                      drop_last=drop_last, distributed=distributed, seed=seed)
    if not loaders:
        raise DataError(f"{data_dir}: no train/val/test .beton files; write them with "
                        f"`python -m data_pipeline.write dvs-cifar10 --src SRC --out {data_dir}`")
    return loaders
