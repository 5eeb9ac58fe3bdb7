"""Image datasets -> .beton -> FFCV loaders, on real images, through real FFCV files.

Sources: full Fashion-MNIST (Debian package), the 20 real CIFAR-10 test images and the 20
real ImageNet photos from the foolbox wheel, laid out in the official on-disk formats.
"""
from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataError
from data_pipeline.images import DEMO_SRC, ArrayImages, write_cifar10, write_demo, write_imagenet
from data_pipeline.inspect import beton_summary, open_beton
from data_pipeline.inspect import main as inspect_main
from data_pipeline.loaders import NORMALIZATION, check_options, make_loaders
from data_pipeline.splits import atomic_beton, carve_val, write_beton
from data_pipeline.write import main as write_main

REPO = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not DEMO_SRC.is_dir(), reason="apt-get install -y dataset-fashion-mnist")


# ---------------------------------------------------------------------------- helpers

def read_stored(path, indices=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Samples ``indices`` (default all) exactly as stored: raw bytes as they are, JPEG bytes
    decoded by PIL. Reads the file directly, independently of FFCV's loader."""
    reader = open_beton(path)
    indices = range(int(reader.num_samples)) if indices is None else indices
    images_meta, labels = reader.metadata["f0"], reader.metadata["f1"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    images = []
    for i in indices:
        m = images_meta[i]
        ptr, h, w = int(m["data_ptr"]), int(m["height"]), int(m["width"])
        if m["mode"] == 1:  # raw
            images.append(np.array(data[ptr:ptr + h * w * 3]).reshape(h, w, 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(data[ptr:ptr + sizes[ptr]].tobytes())).convert("RGB")))
    return images, labels[list(indices)].astype(np.int64)


def read_loader(loader, dataset) -> tuple[np.ndarray, np.ndarray]:
    """All batches of ``loader``, de-normalised back to uint8 [N, H, W, C], and labels."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[dataset])
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.is_contiguous() and y.dtype == torch.int64 and y.ndim == 1
        xs.append((x * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy())
        ys.append(y.numpy().copy())
    return np.concatenate(xs), np.concatenate(ys)


def idx_images(name: str) -> np.ndarray:
    """An IDX image file read independently of the writer: 16-byte header, then pixels."""
    with gzip.open(DEMO_SRC / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def idx_labels(name: str) -> np.ndarray:
    with gzip.open(DEMO_SRC / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)


def ffcv_resized(image: np.ndarray, max_resolution: int) -> np.ndarray:
    """What FFCV stores for ``image``: longest side capped by an area resize."""
    h, w = image.shape[:2]
    ratio = max_resolution / max(h, w)
    if ratio >= 1:
        return image
    return cv2.resize(image, tuple((ratio * np.array([w, h])).astype(int)), interpolation=cv2.INTER_AREA)


def make_cifar_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The official cifar-10-batches-py layout: 5 train batches, test_batch, batches.meta."""
    src = root / "cifar-10-batches-py"
    src.mkdir(parents=True)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(src / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": rows,
                         b"filenames": [b"x.png"] * len(x)}, f)

    for i in range(5):
        dump(f"data_batch_{i + 1}", images[4 * i:4 * i + 4], labels[4 * i:4 * i + 4])
    dump("test_batch", images, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}, f)
    return root


def make_imagenet_tree(root: Path, jpegs: list[tuple[bytes, int]]) -> Path:
    """train/<wnid>/*.JPEG with all 20 photos at varied sizes, qualities and colour modes
    (one greyscale, one CMYK, as real ImageNet has), val/<wnid>/ with 8 of them."""
    sizes = [None, (160, 240), (500, 333), (96, 128), (640, 427), (300, 300), (1024, 683), (75, 100)]
    for split, count in (("train", 20), ("val", 8)):
        for i, (data, label) in enumerate(jpegs[:count]):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            size = sizes[(i + (split == "val")) % len(sizes)]
            if size:
                image = image.resize(size, Image.BILINEAR)
            if i == 3:
                image = image.convert("L")
            if i == 5:
                image = image.convert("CMYK")
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{split}_{i:02d}.JPEG", quality=[95, 75, 90][i % 3])
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, cifar10_images):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_tree(root / "src", *cifar10_images)
    write_cifar10(root / "src", root / "out", val_size=4, seed=3, num_workers=2)
    return root


@pytest.fixture(scope="module")
def imagenet_src(tmp_path_factory, imagenet_jpegs):
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet") / "src", imagenet_jpegs)


# ---------------------------------------------------------------------------- splits

def test_carve_val_is_seeded_disjoint_and_complete():
    train, val = carve_val(1000, 100, seed=7)
    again_train, again_val = carve_val(1000, 100, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert len(val) == 100 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(1000))
    assert not np.array_equal(val, carve_val(1000, 100, seed=8)[1])
    assert len(carve_val(1000, 0.25, seed=0)[1]) == 250
    for bad in (0, 1000, 1.5, -3):
        with pytest.raises(DataError, match="val_size"):
            carve_val(1000, bad, seed=0)


class _FailsAtFive(ArrayImages):
    def __getitem__(self, i):
        if i == 5:
            raise DataError(f"sample {i}: cannot decode")
        return super().__getitem__(i)


def test_write_never_leaves_a_partial_beton(tmp_path, cifar10_images):
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(), "label": IntField()}
    out = tmp_path / "train.beton"
    with pytest.raises(DataError, match=r"1 sample\(s\) could not be read: sample 5: cannot decode"):
        write_beton(out, _FailsAtFive(*cifar10_images), fields, num_workers=2)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_beton(out) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    write_beton(out, ArrayImages(*cifar10_images), fields, num_workers=2)
    with pytest.raises(DataError, match=f"{out}: already exists"):
        write_beton(out, ArrayImages(*cifar10_images), fields)
    assert write_beton(out, ArrayImages(*cifar10_images), fields, indices=[1, 2], overwrite=True) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.beton"]


# ---------------------------------------------------------------------------- demo

@needs_fashion
def test_demo_round_trip_is_exact(tmp_path):
    meta = write_demo(out_dir=tmp_path, num_workers=2)
    assert meta["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert meta["image_height"] == [32, 32] and meta["num_classes"] == 10
    assert json.loads((tmp_path / "meta.json").read_text())["val"] == {"size": 5000, "seed": 0, "carved_from": "train"}

    def rgb32(x):
        return np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)

    # test split through the real eval loader, in file order, every sample
    test_x, test_y = read_loader(make_loaders("demo", tmp_path, batch_size=1000)["test"], "demo")
    assert np.array_equal(test_x, rgb32(idx_images("t10k-images-idx3-ubyte.gz")))
    assert np.array_equal(test_y, idx_labels("t10k-labels-idx1-ubyte.gz"))

    # train/val: sample j of each file is source sample idx[j]; check a spread of indices
    source_x, source_y = idx_images("train-images-idx3-ubyte.gz"), idx_labels("train-labels-idx1-ubyte.gz")
    for split, idx in zip(("train", "val"), carve_val(60000, 5000, seed=0)):
        assert np.array_equal(open_beton(tmp_path / f"{split}.beton").metadata["f1"], source_y[idx])
        some = np.linspace(0, len(idx) - 1, 200).astype(int)
        images, _ = read_stored(tmp_path / f"{split}.beton", some)
        assert np.array_equal(np.stack(images), rgb32(source_x[idx[some]]))


# ---------------------------------------------------------------------------- CIFAR-10

def test_cifar10_round_trip_is_exact(cifar_dir, cifar10_images):
    images, labels = cifar10_images
    out = cifar_dir / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": 16, "val": 4, "test": 20} and meta["classes"][3] == "cat"
    train_idx, val_idx = carve_val(20, 4, seed=3)
    for split, idx in (("train", train_idx), ("val", val_idx), ("test", np.arange(20))):
        stored, stored_labels = read_stored(out / f"{split}.beton")
        assert np.array_equal(np.stack(stored), images[idx]) and np.array_equal(stored_labels, labels[idx])

    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # FFCV alone would reset it to num_workers (1) at each step below
    loaders = make_loaders("cifar10", out, batch_size=8)
    assert {k: v.num_samples for k, v in loaders.items()} == {"train": 16, "val": 4, "test": 20}
    test_x, test_y = read_loader(loaders["test"], "cifar10")
    assert np.array_equal(test_x, images) and test_y.tolist() == labels.tolist()
    assert torch.get_num_threads() == 3
    torch.set_num_threads(threads)

    # train: each output is its source shifted by up to 4 px (zero fill), maybe mirrored
    padded = np.pad(images[train_idx], ((0, 0), (4, 4), (4, 4), (0, 0)))
    crops = np.stack([padded[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)], axis=1)
    candidates = np.concatenate([crops, crops[:, :, :, ::-1]], axis=1)  # [16, 162, 32, 32, 3]
    train_x, train_y = read_loader(loaders["train"], "cifar10")
    assert sorted(train_y.tolist()) == sorted(labels[train_idx].tolist())
    for x, y in zip(train_x, train_y):
        sources = np.flatnonzero(labels[train_idx] == y)
        assert (candidates[sources] == x).all(axis=(2, 3, 4)).any()
    unchanged = [(images[train_idx] == x).all(axis=(1, 2, 3)).any() for x in train_x]
    assert not all(unchanged)  # 16 identity draws in a row: odds (1/162)^16


def test_kept_batches_must_be_cloned(cifar_dir, cifar10_images):
    """Budget calibration keeps the first val batches: FFCV refills a batch's buffer once it
    has prefetched further, so only clones hold the data, the same on every pass."""
    images, _ = cifar10_images
    loader = make_loaders("cifar10", cifar_dir / "out", batch_size=2)["test"]
    held = [x for x, _ in itertools.islice(loader, 6)]
    clones = [[x.clone() for x, _ in itertools.islice(loader, 6)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*clones))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    first = (torch.cat(clones[0]) * std + mean).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(first, images[:12])
    assert not all(torch.equal(h, c) for h, c in zip(held, clones[0]))


# ---------------------------------------------------------------------------- ImageNet

def test_imagenet_raw_round_trip(tmp_path, imagenet_src, imagenet_jpegs):
    meta = write_imagenet(imagenet_src, tmp_path, val_size=4, seed=1, write_mode="raw", max_resolution=256,
                          num_workers=2)
    class_index = json.loads((tmp_path / "class_index.json").read_text())
    assert list(class_index) == sorted(f"n{label:08d}" for label in {lab for _, lab in imagenet_jpegs})
    assert meta["counts"] == {"train": 16, "val": 4, "test": 8} and meta["skipped"] == []
    assert meta["image_height"][1] <= 256 and meta["image_width"][1] <= 256
    assert (meta["image_height"][0], meta["image_width"][0]) == (100, 75)  # the 75x100 source

    files = sorted((imagenet_src / "train").glob("*/*.JPEG"))  # ImageFolder order: class, then name
    for split, idx in zip(("train", "val"), carve_val(len(files), 4, seed=1)):
        stored, labels = read_stored(tmp_path / f"{split}.beton")
        for image, label, path in zip(stored, labels, [files[i] for i in idx]):
            assert label == class_index[path.parent.name]
            assert np.array_equal(image, ffcv_resized(np.asarray(Image.open(path).convert("RGB")), 256))


def test_imagenet_loaders_decode_real_jpegs(tmp_path, imagenet_src):
    write_imagenet(imagenet_src, tmp_path, val_size=4, write_mode="jpg", jpeg_quality=90, max_resolution=256,
                   num_workers=2)
    assert beton_summary(tmp_path / "test.beton")["image_modes"] == {"raw": 0, "jpg": 8}
    loaders = make_loaders("imagenet", tmp_path, batch_size=4, image_size=64)

    # eval: Resize(256/224 * 64) + CenterCrop(64) in one step, against a PIL + OpenCV reference
    test_x, test_y = read_loader(loaders["test"], "imagenet")
    files = sorted((imagenet_src / "val").glob("*/*.JPEG"))
    for x, path in zip(test_x, files):
        image = ffcv_resized(np.asarray(Image.open(path).convert("RGB")), 256)
        h, w = image.shape[:2]
        c = int(224 / 256 * min(h, w))
        crop = image[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        expected = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA)
        assert np.abs(x.astype(int) - expected).mean() < 4  # two JPEG generations apart
    assert len(test_y) == 8

    x, y = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.shape == (4,)
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7 and x.std() > 0.3


def test_imagenet_raw_images_larger_than_a_page(tmp_path, imagenet_jpegs):
    """A 2100x1700 raw image is 10.7 MB, more than FFCV's default 8 MiB page."""
    photo = Image.open(io.BytesIO(imagenet_jpegs[0][0])).convert("RGB").resize((2100, 1700), Image.BICUBIC)
    for split, names in (("train", ("big", "a", "b")), ("val", ("c",))):
        (tmp_path / "src" / split / "n1").mkdir(parents=True)
        for name in names:
            (photo if name == "big" else photo.resize((64, 48))).save(tmp_path / "src" / split / "n1" / f"{name}.JPEG")
    meta = write_imagenet(tmp_path / "src", tmp_path / "out", val_size=1, seed=0, write_mode="raw",
                          max_resolution=2100, num_workers=1)
    assert meta["image_width"] == [64, 2100] and meta["image_height"] == [48, 1700]


# ---------------------------------------------------------------------------- distributed

RANK_SCRIPT = """
import json, sys, torch
from data_pipeline.loaders import make_loaders
torch.distributed.init_process_group("gloo")
loaders = make_loaders("cifar10", sys.argv[1], batch_size=4, distributed=True, drop_last=False, seed=5)
seen = {"train": [[int(v) for _, y in loaders["train"] for v in y] for _ in range(2)],
        "test": [int(v) for _, y in loaders["test"] for v in y],
        "num_samples": {k: v.num_samples for k, v in loaders.items()}}
torch.distributed.destroy_process_group()
print(json.dumps(seen))
"""


def test_distributed_ranks_split_each_epoch(tmp_path, cifar10_images):
    """Two real ranks (gloo on 127.0.0.1). Labels are sample ids, so each rank's labels say
    exactly which samples it read."""
    from ffcv.fields import IntField, RGBImageField

    images = np.concatenate([cifar10_images[0]] * 2)
    fields = {"image": RGBImageField(), "label": IntField()}
    write_beton(tmp_path / "train.beton", ArrayImages(images[:24], np.arange(24)), fields)
    write_beton(tmp_path / "test.beton", ArrayImages(images[:23], np.arange(23)), fields)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], cwd=REPO, text=True,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    rank0, rank1 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)

    assert rank0["num_samples"] == {"train": 12, "test": 12} and rank1["num_samples"] == {"train": 12, "test": 11}
    for epoch in range(2):
        a, b = rank0["train"][epoch], rank1["train"][epoch]
        assert len(a) == len(b) == 12 and sorted(a + b) == list(range(24))
    assert rank0["train"][0] != rank0["train"][1]  # reshuffled each epoch
    assert rank0["test"] == list(range(0, 23, 2)) and rank1["test"] == list(range(1, 23, 2))


# ---------------------------------------------------------------------------- bad input

def test_imagenet_layout_errors(tmp_path, imagenet_src):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: ImageNet folder not found"):
        write_imagenet(tmp_path / "nowhere", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty' / 'train'}: missing"):
        write_imagenet(tmp_path / "empty", out)
    flat = tmp_path / "flat"
    shutil.copytree(imagenet_src, flat)
    for f in (flat / "val").glob("*/*.JPEG"):
        f.rename(flat / "val" / f.name)
    with pytest.raises(DataError, match=f"{flat / 'val'}: holds images directly"):
        write_imagenet(flat, out)
    (flat / "val" / "n99999999").mkdir()
    for f in (flat / "val").glob("*.JPEG"):
        f.rename(flat / "val" / "n99999999" / f.name)
    for d in (flat / "val").glob("n0*"):
        d.rmdir()
    with pytest.raises(DataError, match=f"{flat / 'val' / 'n99999999'}: class folder not present in train/"):
        write_imagenet(flat, out)
    assert not out.exists()


def test_imagenet_unreadable_images_skip_or_fail(tmp_path, imagenet_src):
    src = tmp_path / "src"
    shutil.copytree(imagenet_src, src)
    victim = sorted((src / "train").glob("*/*.JPEG"))[2]
    cut = victim.with_name("truncated.JPEG")
    cut.write_bytes(victim.read_bytes()[:2000])
    text = victim.with_name("notes.JPEG")
    text.write_text("not an image")

    with pytest.raises(DataError, match=r"unreadable image .*2 unreadable in all"):
        write_imagenet(src, tmp_path / "fail", val_size=4, on_bad_image="fail", num_workers=2)
    assert not (tmp_path / "fail" / "train.beton").exists()

    meta = write_imagenet(src, tmp_path / "skip", val_size=4, write_mode="raw", num_workers=2)
    assert sorted(s["path"] for s in meta["skipped"]) == sorted([str(text), str(cut)])
    assert meta["counts"]["train"] + meta["counts"]["val"] == 20


def test_cifar10_source_errors(tmp_path, cifar10_images):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: CIFAR-10 folder not found"):
        write_cifar10(tmp_path / "nowhere", tmp_path / "out")
    src = make_cifar_tree(tmp_path / "src", *cifar10_images) / "cifar-10-batches-py"
    (src / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"{src / 'data_batch_3'}: missing"):
        write_cifar10(src, tmp_path / "out")
    (src / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match=f"{src / 'data_batch_3'}: not a CIFAR-10 python pickle"):
        write_cifar10(src, tmp_path / "out")
    with open(src / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 batch \(data uint8 \(4, 100\)"):
        write_cifar10(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_demo_source_errors(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/none: Fashion-MNIST not found; install it with "
                                        r"`apt-get install -y dataset-fashion-mnist`"):
        write_demo(tmp_path / "none", tmp_path / "out")
    src = tmp_path / "fm"
    src.mkdir()
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + b"\x00" * 100)
    with pytest.raises(DataError, match=f"{src / 'train-images-idx3-ubyte.gz'}: not an IDX file"):
        write_demo(src, tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite(cifar_dir):
    out = cifar_dir / "out"
    before = (out / "train.beton").stat().st_mtime_ns
    with pytest.raises(DataError, match=f"{out / 'train.beton'}: already exists; pass --overwrite"):
        write_cifar10(cifar_dir / "src", out, val_size=4)
    assert (out / "train.beton").stat().st_mtime_ns == before
    meta = write_cifar10(cifar_dir / "src", out, val_size=4, seed=3, overwrite=True, num_workers=1)
    assert (out / "train.beton").stat().st_mtime_ns != before and meta["counts"]["val"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.beton", "train.beton", "val.beton"]


def test_cli_errors_are_one_line(tmp_path, cifar_dir, cifar10_images, capsys):
    assert write_main(["cifar10", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'nowhere'}: CIFAR-10 folder not found")

    assert write_main(["cifar10", "--src", str(cifar_dir / "src"), "--out", str(tmp_path / "out"),
                       "--val-size", "0.25", "--seed", "3", "--num-workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"] == {"train": 15, "val": 5, "test": 20}
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "out" / "test.beton"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 20 and summary["image_height"] == [32, 32]
    labels, counts = np.unique(cifar10_images[1], return_counts=True)
    assert summary["labels"] == {str(k): int(v) for k, v in zip(labels, counts)}

    assert write_main(["dvs-cifar10", "--src", str(tmp_path / "no-dvs"), "--out", str(tmp_path / "dvs")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'no-dvs'}: ")

    # the real entry point: exit status and a single stderr line, before FFCV is imported
    run = subprocess.run([sys.executable, "-m", "data_pipeline.write", "demo", "--src", str(tmp_path / "none"),
                          "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "apt-get install -y dataset-fashion-mnist" in run.stderr


def test_loader_rejects_bad_files_and_options(tmp_path, cifar_dir):
    with pytest.raises(DataError, match=f"{tmp_path}: no train/val/test.beton here"):
        make_loaders("cifar10", tmp_path, batch_size=4)
    shutil.copy(cifar_dir / "out" / "test.beton", tmp_path / "test.beton")
    data = (tmp_path / "test.beton").read_bytes()
    (tmp_path / "test.beton").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=f"{tmp_path / 'test.beton'}: truncated or unfinished FFCV .beton"):
        make_loaders("cifar10", tmp_path, batch_size=4)
    (tmp_path / "test.beton").write_bytes(data[:-24])
    with pytest.raises(DataError, match=r"truncated FFCV .beton \(data of 1 of 20 samples missing\)"):
        make_loaders("cifar10", tmp_path, batch_size=4)
    (tmp_path / "test.beton").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 4096)
    with pytest.raises(DataError, match=f"{tmp_path / 'test.beton'}: not an FFCV .beton"):
        make_loaders("cifar10", tmp_path, batch_size=4)
    with pytest.raises(DataError, match=f"{tmp_path / 'missing.beton'}: no such .beton file"):
        open_beton(tmp_path / "missing.beton")

    with pytest.raises(DataError, match="order='quasi_random' is not supported with distributed=True"):
        check_options("quasi_random", True, "cpu")
    if not torch.distributed.is_initialized():  # an earlier in-process test may have made a group
        with pytest.raises(DataError, match="distributed=True needs torch.distributed.init_process_group"):
            check_options("random", True, "cpu")
    with pytest.raises(DataError, match="order='shuffled'"):
        check_options("shuffled", False, "cpu")
    with pytest.raises(DataError, match="image_size=64: cifar10 images are stored at 32x32"):
        make_loaders("cifar10", cifar_dir / "out", batch_size=4, image_size=64)
    with pytest.raises(DataError, match=str(tmp_path / "no-dvs")):
        make_loaders("dvs_cifar10", tmp_path / "no-dvs", batch_size=4)
    with pytest.raises(DataError, match="dataset='mnist'"):
        make_loaders("mnist", cifar_dir / "out", batch_size=4)
