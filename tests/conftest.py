"""Shared fixtures: the real CIFAR-10 and ImageNet images shipped inside the foolbox wheel.

The wheel (1.7 MB, MIT) is fetched once with ``pip download`` into ``.cache/foolbox/`` and
read as a zip; foolbox itself is never installed or imported.
"""
from __future__ import annotations

import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FOOLBOX = "foolbox==3.3.4"
# The first 20 images of the official CIFAR-10 test set, as foolbox ships them.
CIFAR10_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]


@pytest.fixture(scope="session")
def foolbox_wheel() -> Path:
    cache = REPO / ".cache" / "foolbox"
    wheels = sorted(cache.glob("foolbox-3.3.4-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), FOOLBOX],
                       check=True)
        wheels = sorted(cache.glob("foolbox-3.3.4-*.whl"))
    return wheels[0]


def _members(wheel: Path, prefix: str) -> list[tuple[int, int, bytes]]:
    """(index, label, file bytes) of ``foolbox/data/<prefix>_<NN>_<label>.*``, by index."""
    pattern = re.compile(rf"foolbox/data/{prefix}_(\d+)_(\d+)\.\w+$")
    with zipfile.ZipFile(wheel) as z:
        found = [(int(m[1]), int(m[2]), z.read(name)) for name in z.namelist() if (m := pattern.match(name))]
    return sorted(found)


@pytest.fixture(scope="session")
def cifar10_images(foolbox_wheel) -> tuple[np.ndarray, np.ndarray]:
    """The 20 real CIFAR-10 test images: uint8 [20, 32, 32, 3] and int64 labels [20]."""
    from PIL import Image

    members = _members(foolbox_wheel, "cifar10")
    images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, _, data in members])
    labels = np.array([label for _, label, _ in members], dtype=np.int64)
    assert images.shape == (20, 32, 32, 3) and labels.tolist() == CIFAR10_LABELS
    return images, labels


@pytest.fixture(scope="session")
def imagenet_jpegs(foolbox_wheel) -> list[tuple[bytes, int]]:
    """The 20 real ImageNet photos as (JPEG bytes, ImageNet-1k label)."""
    members = _members(foolbox_wheel, "imagenet")
    assert len(members) == 20
    return [(data, label) for _, label, data in members]


@pytest.fixture(scope="session")
def fashion_test_images():
    """The first 64 real Fashion-MNIST test images (Debian's dataset-fashion-mnist, which
    install.sh installs) as the demo loader gives them: padded to 32x32x3, normalised; labels."""
    import torch

    from data_pipeline.images import read_fashion_mnist, to_rgb32
    from data_pipeline.loaders import NORMALIZATION

    _, (x, y) = read_fashion_mnist()
    img = torch.from_numpy(to_rgb32(x[:64])).permute(0, 3, 1, 2).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["demo"])
    return (img - mean) / std, torch.from_numpy(y[:64])
