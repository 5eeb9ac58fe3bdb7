"""FFCV loaders for the written datasets, with the paper's augmentations.

``make_loaders(dataset, data_dir, batch_size=...)`` -> {"train", "val", "test"} loaders
(a split whose .beton is absent is left out). Batches are ``(x, y)``: x float32
[N, C, H, W] normalised, y int64 [N]. Train: CIFAR/demo RandomCrop(32, pad 4) + flip,
ImageNet RandomResizedCrop + flip; val/test: no augmentation (ImageNet: centre crop of
224/256 of the short side, as ffcv-imagenet). Val/test are read in file order.
A batch is valid until the loader has prefetched a few more: FFCV refills the same buffers,
so code that keeps batches (budget calibration) must clone them.

Distributed: train uses FFCV's sharding (a per-epoch global shuffle, padded so every rank
takes the same number of steps); val/test are split exactly, rank r reading samples
r, r + W, r + 2W, ..., so sums of per-rank counts give exact metrics.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder, NDArrayDecoder,
                                  RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor

from data_pipeline import DATASETS, DataError
from data_pipeline.event_augment import nda_augment
from data_pipeline.inspect import open_beton
from data_pipeline.splits import SPLITS
from data_pipeline.seeded_augment import SeededCropFlip
from data_pipeline.transforms import NormalizeToCHW

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
          "sequential": OrderOption.SEQUENTIAL}
# Per-channel mean and std on the 0-255 scale. demo: Fashion-MNIST train after padding to 32x32.
NORMALIZATION = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "cifar10": ((0.4914 * 255, 0.4822 * 255, 0.4465 * 255), (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)),
    "demo": ((0.2190 * 255,) * 3, (0.3318 * 255,) * 3),
}
IMAGENET_SIZE = 224
IMAGENET_CROP_RATIO = 224 / 256  # eval: Resize(256) + CenterCrop(224), as one decode step


class BetonLoader(Loader):
    """An FFCV ``Loader`` that knows its epoch size and leaves torch's thread count alone.

    ``num_samples``: samples this rank gets per epoch (after sharding and drop_last).
    FFCV calls ``torch.set_num_threads(num_workers)`` on construction and at every epoch
    start; with one loader worker that would quietly make CPU training single-threaded.
    """

    def __init__(self, *args, **kwargs):
        threads = torch.get_num_threads()
        try:
            super().__init__(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
        n = len(self.first_traversal_order)
        self.num_samples = n // self.batch_size * self.batch_size if self.drop_last else n

    def __iter__(self):
        threads = torch.get_num_threads()
        try:
            return super().__iter__()
        finally:
            torch.set_num_threads(threads)


def check_options(order: str, distributed: bool, device) -> torch.device:
    """Fail early, naming the option, on what FFCV or this machine cannot do."""
    if order not in ORDERS:
        raise DataError(f"order={order!r}: choose one of {', '.join(ORDERS)}")
    if order == "quasi_random" and distributed:
        raise DataError("order='quasi_random' is not supported with distributed=True (FFCV cannot shard it); "
                        "use order='random'")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DataError("distributed=True needs torch.distributed.init_process_group() to have run "
                        "before the loaders are built")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device={str(device)!r} but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"device={str(device)!r}: choose 'cpu' or 'cuda[:N]'")
    return device


def build_loader(path: str | os.PathLike, pipelines: dict, *, train: bool, batch_size: int, num_workers: int = 1,
                 order: str = "random", os_cache: bool = True, drop_last: bool | None = None,
                 distributed: bool = False, seed: int = 0) -> BetonLoader:
    """One loader over ``path`` with FFCV ``pipelines`` ({field: [ops]}); see the module doc
    for how train and eval splits are ordered and sharded. Options must have passed
    ``check_options``."""
    reader = open_beton(path)
    if train:
        loader = BetonLoader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=ORDERS[order], distributed=distributed, seed=seed, pipelines=pipelines,
                             drop_last=True if drop_last is None else drop_last)
    else:
        indices = None
        if distributed:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            indices = np.arange(rank, int(reader.num_samples), world)
        loader = BetonLoader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, indices=indices, seed=seed, pipelines=pipelines,
                             drop_last=False if drop_last is None else drop_last)
    if loader.num_samples == 0:
        raise DataError(f"{path}: {int(reader.num_samples)} samples give this rank no batch of {batch_size} "
                        f"(drop_last={loader.drop_last}); lower batch_size")
    return loader


def check_kind(data_dir: Path, dataset: str, paths, fields: list[str]) -> None:
    """DataError naming the file when `data_dir` holds another data set than `dataset`: by the
    writer's meta.json where there is one, and by every .beton's field layout (an event set read
    as images would otherwise fail deep inside FFCV)."""
    meta = data_dir / "meta.json"
    if meta.is_file():
        try:
            written = json.loads(meta.read_text()).get("dataset")
        except (ValueError, AttributeError):
            raise DataError(f"{meta}: not a readable meta.json") from None
        if written is not None and written != dataset:
            raise DataError(f"{data_dir} holds the {written} data set ({meta}), not {dataset}")
    for path in paths:
        found = list(open_beton(path).handlers)
        if found != fields:
            raise DataError(f"{path}: not a {dataset} .beton (fields {', '.join(found)}; "
                            f"expected {', '.join(fields)})")


def image_pipelines(dataset: str, *, train: bool, device: torch.device, image_size: int | None = None,
                    seed: int = 0) -> dict:
    """FFCV pipelines for the ``image`` and ``label`` fields of an image dataset."""
    if dataset == "imagenet":
        size = (image_size or IMAGENET_SIZE,) * 2
        decoder = (RandomResizedCropRGBImageDecoder(size) if train
                   else CenterCropRGBImageDecoder(size, ratio=IMAGENET_CROP_RATIO))
        augment = [RandomHorizontalFlip()] if train else []
    else:
        if image_size not in (None, 32):
            raise DataError(f"image_size={image_size}: {dataset} images are stored at 32x32; "
                            f"image_size applies to imagenet")
        decoder = SimpleRGBImageDecoder()
        # seeded, so that a resumed run sees the crops an uninterrupted one would
        augment = [SeededCropFlip(padding=4, seed=seed)] if train else []
    image = [decoder, *augment, NormalizeToCHW(*NORMALIZATION[dataset]), ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type == "cuda":
        image.append(ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    return {"image": image, "label": label}


def make_loaders(dataset: str, data_dir: str | os.PathLike, *, batch_size: int, num_workers: int = 1,
                 order: str = "random", os_cache: bool = True, drop_last: bool | None = None,
                 distributed: bool = False, device: str | torch.device = "cpu", seed: int = 0,
                 image_size: int | None = None) -> dict[str, BetonLoader]:
    """{"train", "val", "test"} -> loader over ``data_dir/<split>.beton``.

    ``order`` (random | quasi_random | sequential) and ``seed`` set the train order; val and
    test are sequential. ``drop_last`` defaults to True for train, False for val/test.
    ``distributed`` shards by rank (the process group must exist). ``device`` "cuda[:N]"
    moves batches there (non-blocking, from pinned memory). ``image_size``: ImageNet
    crop size (default 224). Each loader has ``num_samples`` (this rank, per epoch).
    """
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, order=order, os_cache=os_cache,
                  drop_last=drop_last, distributed=distributed, device=device, seed=seed)
    if dataset == "dvs_cifar10":
        return dvs_loaders(data_dir, **kwargs, **({} if image_size is None else {"image_size": image_size}))
    if dataset not in DATASETS:
        raise DataError(f"dataset={dataset!r}: choose one of {', '.join(DATASETS)}")
    device = check_options(order, distributed, device)
    data_dir = Path(data_dir)
    paths = {s: data_dir / f"{s}.beton" for s in SPLITS if (data_dir / f"{s}.beton").exists()}
    if not paths:
        raise DataError(f"{data_dir}: no train/val/test.beton here; write them with "
                        f"python -m data_pipeline.write {dataset.replace('_', '-')} --out {data_dir}")
    check_kind(data_dir, dataset, paths.values(), ["image", "label"])
    return {split: build_loader(path, image_pipelines(dataset, train=split == "train", device=device, seed=seed,
                                                      image_size=image_size),
                                train=split == "train", batch_size=batch_size, num_workers=num_workers,
                                order=order, os_cache=os_cache, drop_last=drop_last, distributed=distributed,
                                seed=seed)
            for split, path in paths.items()}


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
    in sequence. Ordering, drop_last and sharding are those of `build_loader`; with
    distributed, each rank also augments with its own seed.
    """
    data_dir = Path(data_dir)
    device = check_options(order, distributed, device)
    rank = torch.distributed.get_rank() if distributed else 0
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loaders = {}
    check_kind(data_dir, "dvs_cifar10",
               [data_dir / f"{s}.beton" for s in SPLITS if (data_dir / f"{s}.beton").is_file()],
               ["frames", "label"])
    for split in SPLITS:
        path = data_dir / f"{split}.beton"
        if not path.is_file():
            continue
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
