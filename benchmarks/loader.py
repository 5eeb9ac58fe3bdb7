"""Images/s of our FFCV train loaders against the standard PyTorch pipeline, side by side.

    .venv/bin/python -m benchmarks.loader [--images 2000] [--batch-size 64] [--num-workers N] [--repeats 5]

ImageNet-style: ``--images`` real JPEGs (the 20 foolbox ImageNet photos, re-encoded from
random crops at varied sizes and qualities, ImageFolder layout). FFCV reads them from a
.beton written by ``data_pipeline.images.write_imagenet`` (ffcv-imagenet defaults: longest side
<= 500, half JPEG q90, half raw); PyTorch reads the JPEG files: PIL decode, RandomResizedCrop
(torchvision's sampling, bilinear) + flip, to float, normalise, in a ``DataLoader``.
CIFAR-size: the 55,000 Fashion-MNIST 32x32 demo images, RandomCrop(32, pad 4) + flip +
normalise, FFCV vs a ``DataLoader`` over PIL images as torchvision's CIFAR10 gives them.

Both sides: same batch size, workers (FFCV threads vs DataLoader processes), float32
[N, 3, H, W] normalised output, one untimed warm-up epoch (FFCV JIT, worker start, page
cache). Timed epochs alternate between the two so that load drift hits both alike; the
speedup is the median of the paired ratios. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from data_pipeline.images import write_demo, write_imagenet
from data_pipeline.loaders import NORMALIZATION, make_loaders

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench_loader"


# ---------------------------------------------------------------------------- data

def foolbox_photos() -> list[tuple[Image.Image, int]]:
    """The 20 real ImageNet photos inside the foolbox 3.3.4 wheel (fetched once by pip)."""
    wheel_dir = REPO / ".cache" / "foolbox"
    if not list(wheel_dir.glob("foolbox-3.3.4-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir),
                        "foolbox==3.3.4"], check=True)
    with zipfile.ZipFile(next(wheel_dir.glob("foolbox-3.3.4-*.whl"))) as z:
        names = sorted(n for n in z.namelist() if n.startswith("foolbox/data/imagenet_"))
        return [(Image.open(io.BytesIO(z.read(n))).convert("RGB"), int(Path(n).stem.split("_")[-1])) for n in names]


def make_jpeg_tree(root: Path, count: int) -> Path:
    """ImageFolder tree of ``count`` JPEGs: random crops of the photos, short side 200-500 px,
    aspect 3:4 to 4:3, quality 70-95 (ImageNet's typical range). Cached by count."""
    if (root / "done").exists():
        return root
    photos, rng = foolbox_photos(), random.Random(0)
    for split, n in (("train", count), ("val", 20)):
        for k in range(n):
            photo, label = photos[k % len(photos)]
            w, h = photo.size
            cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            short, aspect = rng.randint(200, 500), rng.uniform(3 / 4, 4 / 3)
            size = (round(short * max(aspect, 1)), round(short / min(aspect, 1)))
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(
                folder / f"{k:06d}.JPEG", quality=rng.randint(70, 95))
    (root / "done").touch()
    return root


def ensure_written(out: Path, write) -> Path:
    if not (out / "meta.json").exists():
        write()
    return out


# ---------------------------------------------------------------------------- PyTorch baseline

def random_resized_crop_params(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision ``ToTensor`` + ``Normalize``: HWC uint8 -> CHW float32."""
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255)
    return (x - mean) / std


class JpegFolder(torch.utils.data.Dataset):
    """ImageFolder + RandomResizedCrop(size) + RandomHorizontalFlip + ToTensor + Normalize."""

    def __init__(self, root: Path, size: int):
        classes = sorted(p.name for p in root.iterdir())
        self.samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
        self.size = size
        mean, std = NORMALIZATION["imagenet"]
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        top, left, h, w = random_resized_crop_params(*image.size)
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized(image, self.mean, self.std), label


class SmallImages(torch.utils.data.Dataset):
    """torchvision CIFAR10-style: PIL image per sample, RandomCrop(32, pad 4) + flip + normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, dataset: str):
        self.images, self.labels = images, labels
        mean, std = NORMALIZATION[dataset]
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1) / 255, torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = ImageOps.expand(Image.fromarray(self.images[i]), border=4, fill=0)
        top, left = random.randint(0, 8), random.randint(0, 8)
        image = image.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized(image, self.mean, self.std), int(self.labels[i])


def torch_loader(dataset, batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------- timing

def epoch_rate(loader) -> tuple[float, tuple]:
    """Images/s over one epoch, and the first batch's shape/dtype for the report."""
    start, n, first = time.perf_counter(), 0, None
    for x, _ in loader:
        first = first or (tuple(x.shape), str(x.dtype))
        n += len(x)
    return n / (time.perf_counter() - start), first


def compare(name: str, ffcv, baseline, repeats: int) -> dict:
    start = time.perf_counter()
    _, ffcv_batch = epoch_rate(ffcv)
    warm_ffcv = time.perf_counter() - start
    _, torch_batch = epoch_rate(baseline)
    assert ffcv_batch == torch_batch, (ffcv_batch, torch_batch)
    ffcv_rates, torch_rates = [], []
    for r in range(repeats):
        pair = [(ffcv, ffcv_rates), (baseline, torch_rates)]
        for loader, rates in pair if r % 2 == 0 else pair[::-1]:
            rates.append(epoch_rate(loader)[0])
    return {"name": name, "batch": ffcv_batch[0], "ffcv_images_per_s": statistics.median(ffcv_rates),
            "pytorch_images_per_s": statistics.median(torch_rates),
            "speedup": statistics.median(f / t for f, t in zip(ffcv_rates, torch_rates)),
            "ffcv_first_epoch_s": warm_ffcv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the ImageNet-style set")
    parser.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop output side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per side")
    parser.add_argument("--skip-cifar", action="store_true", help="only the ImageNet-style comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.num_workers)

    src = make_jpeg_tree(CACHE / f"jpegs_{args.images}", args.images)
    beton_dir = ensure_written(CACHE / f"imagenet_{args.images}", lambda: write_imagenet(
        src, CACHE / f"imagenet_{args.images}", val_size=10, num_workers=args.num_workers, overwrite=True))
    ffcv = make_loaders("imagenet", beton_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                        image_size=args.image_size)["train"]
    baseline = torch_loader(JpegFolder(src / "train", args.image_size), args.batch_size, args.num_workers)
    results = [compare("imagenet-style JPEG", ffcv, baseline, args.repeats)]

    if not args.skip_cifar:
        from data_pipeline.images import read_fashion_mnist, to_rgb32
        from data_pipeline.splits import carve_val

        demo_dir = ensure_written(CACHE / "demo", lambda: write_demo(
            out_dir=CACHE / "demo", num_workers=args.num_workers, overwrite=True))
        (train_x, train_y), _ = read_fashion_mnist()
        train_idx, _ = carve_val(len(train_x), 5000, seed=0)  # the same 55,000 images as train.beton
        ffcv = make_loaders("demo", demo_dir, batch_size=args.batch_size, num_workers=args.num_workers)["train"]
        baseline = torch_loader(SmallImages(to_rgb32(train_x)[train_idx], train_y[train_idx], "demo"),
                                args.batch_size, args.num_workers)
        results.append(compare("CIFAR-size 32x32", ffcv, baseline, args.repeats))

    print(f"{'pipeline':<22}{'batch':>20}{'FFCV img/s':>12}{'PyTorch img/s':>15}{'speedup':>9}{'FFCV 1st epoch':>16}")
    for r in results:
        print(f"{r['name']:<22}{str(list(r['batch'])):>20}{r['ffcv_images_per_s']:>12.0f}"
              f"{r['pytorch_images_per_s']:>15.0f}{r['speedup']:>8.2f}x{r['ffcv_first_epoch_s']:>15.1f}s")
    print(json.dumps({"speedup": results[0]["speedup"], "results": results, "images": args.images,
                      "batch_size": args.batch_size, "num_workers": args.num_workers,
                      "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
