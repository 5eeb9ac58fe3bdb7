"""Image datasets to .beton: ImageNet (ImageFolder layout), CIFAR-10 (python pickles), demo.

Each ``write_*`` function reads one on-disk source format, checks it, and writes
``train.beton`` (train minus a seeded validation draw), ``val.beton``, ``test.beton`` and
``meta.json`` into ``out_dir``. Every field layout is ``{"image": RGBImageField, "label":
IntField}``, so one loader code path reads them all.
"""
from __future__ import annotations

import codecs
import functools
import gzip
import multiprocessing
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline import DataError
from data_pipeline.splits import SPLITS, carve_val, refuse_existing, write_beton, write_json_atomic

# Same extensions as torchvision's ImageFolder, so a tree that works there works here.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEMO_SRC = Path("/usr/share/datasets/fashion-mnist")
DEMO_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
WRITE_MODES = ("raw", "jpg", "proportion")


def default_workers() -> int:
    return min(16, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- ImageNet

def scan_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/**/<image>`` as (classes, [(path, label)]) in ImageFolder order.

    ``classes`` fixes the class list (val/ must use train/'s indices); a class folder outside
    it, an empty class folder, or images lying directly in ``root`` are layout errors.
    """
    if not root.is_dir():
        raise DataError(f"{root}: missing; expected an ImageFolder tree {root}/<wnid>/*.JPEG")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    found = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if loose:
        raise DataError(f"{root}: holds images directly ({loose[0]}, ...); expected one folder per class, "
                        f"{root}/<wnid>/*.JPEG (sort ImageNet's flat val/ into class folders first)")
    if not found:
        raise DataError(f"{root}: no class folders; expected {root}/<wnid>/*.JPEG")
    classes = found if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in found:
        if name not in index:
            raise DataError(f"{root / name}: class folder not present in train/")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root / name, followlinks=True)
                       for f in fs if f.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f"{root / name}: class folder holds no images ({', '.join(IMG_EXTENSIONS)})")
        samples += [(f, index[name]) for f in files]
    return classes, samples


def probe_image(path: str) -> str | None:
    """Return None if ``path`` decodes as an image, else the reason it does not.

    JPEGs are decoded at 1/8 scale (``draft``): every compressed byte is still read, so
    truncated or corrupt files fail here, at a fraction of a full decode's cost.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return str(err).splitlines()[0] if str(err) else type(err).__name__


class ImageFiles:
    """Indexable (HxWx3 uint8 RGB array, label) over image files, as FFCV's writer needs."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")), label
        except Exception as err:
            raise DataError(f"{path}: {err}") from err


def _find_bad(paths: list[str], num_workers: int, desc: str) -> dict[str, str]:
    from tqdm import tqdm

    with multiprocessing.Pool(num_workers) as pool:
        reasons = list(tqdm(pool.imap(probe_image, paths, chunksize=64), total=len(paths), desc=desc))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def write_imagenet(src, out_dir, *, val_size: int | float = 10000, seed: int = 0, overwrite: bool = False,
                   num_workers: int | None = None, max_resolution: int = 500, jpeg_quality: int = 90,
                   compress_probability: float = 0.5, write_mode: str = "proportion", subset: int = -1,
                   on_bad_image: str = "skip") -> dict:
    """ImageNet ``src/train/<wnid>/*.JPEG`` and ``src/val/<wnid>/*.JPEG`` -> ``out_dir``.

    ``val/`` is the test split (the paper reports on it); our val split is carved out of
    ``train/``. Images are stored as in ffcv-imagenet: longest side capped at
    ``max_resolution``, then raw or JPEG per ``write_mode`` ("proportion": JPEG with
    probability ``compress_probability``). ``subset`` > 0 keeps a seeded draw of that many
    images from each of train/ and val/. Unreadable images are skipped and listed in
    meta.json, or abort the write with ``on_bad_image="fail"``. Returns the meta dict.
    """
    import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
    from ffcv.fields import IntField, RGBImageField

    src, out_dir = Path(src), Path(out_dir)
    if write_mode not in WRITE_MODES:
        raise DataError(f"write_mode={write_mode!r}: choose one of {', '.join(WRITE_MODES)}")
    if on_bad_image not in ("skip", "fail"):
        raise DataError(f"on_bad_image={on_bad_image!r}: choose 'skip' or 'fail'")
    if max_resolution < 1 or not 1 <= jpeg_quality <= 100 or not 0 <= compress_probability <= 1:
        raise DataError(f"max_resolution={max_resolution}, jpeg_quality={jpeg_quality}, compress_probability="
                        f"{compress_probability}: need >= 1, 1..100 and 0..1")
    refuse_existing(_outputs(out_dir, "class_index.json"), overwrite)
    if not src.is_dir():
        raise DataError(f"{src}: ImageNet folder not found; expected {src}/train/<wnid>/*.JPEG and "
                        f"{src}/val/<wnid>/*.JPEG")
    num_workers = num_workers or default_workers()
    classes, train_files = scan_image_folder(src / "train")
    _, test_files = scan_image_folder(src / "val", classes)
    if subset > 0:
        rng = np.random.default_rng(seed)
        train_files, test_files = ([files[i] for i in np.sort(rng.permutation(len(files))[:subset])]
                                   for files in (train_files, test_files))

    bad = _find_bad([p for p, _ in train_files + test_files], num_workers, "checking images")
    if bad and on_bad_image == "fail":
        path, reason = next(iter(bad.items()))
        raise DataError(f"{path}: unreadable image ({reason}); {len(bad)} unreadable in all "
                        f"(--on-bad-image skip leaves them out)")
    train_files = [s for s in train_files if s[0] not in bad]
    test_files = [s for s in test_files if s[0] not in bad]

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality, compress_probability=compress_probability),
              "label": IntField()}
    train_idx, val_idx = carve_val(len(train_files), val_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainval = ImageFiles(train_files)
    for split, dataset, indices in (("train", trainval, train_idx), ("val", trainval, val_idx),
                                    ("test", ImageFiles(test_files), None)):
        print(f"writing {out_dir / f'{split}.beton'} ({len(dataset) if indices is None else len(indices):,} images)")
        write_beton(out_dir / f"{split}.beton", dataset, fields, indices=indices, num_workers=num_workers,
                    overwrite=overwrite, max_sample_bytes=3 * max_resolution ** 2)
    write_json_atomic(out_dir / "class_index.json", {c: i for i, c in enumerate(classes)})
    settings = {"max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality,
                "compress_probability": compress_probability, "subset": subset}
    return _finish(out_dir, "imagenet", classes, src, val_size, seed, settings,
                   skipped=[{"path": p, "reason": r} for p, r in bad.items()])


# ---------------------------------------------------------------------------- CIFAR-10

@functools.cache
def _numpy_globals() -> dict[tuple[str, str], object]:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer

    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): codecs.encode}  # protocol 2 spells bytes as encode(str)
    for module in ("numpy.core", "numpy._core"):  # numpy 1 wrote numpy.core, numpy 2 numpy._core
        found[(f"{module}.multiarray", "_reconstruct")] = _reconstruct
        found[(f"{module}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    return found


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, bytes, str and numbers, and nothing else: a
    pickle names the callables it runs, and CIFAR-10's batches name only numpy's array
    rebuilders, so any other name (os.system, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        allowed = _numpy_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-10 batch never "
                                         f"holds; not loaded")
        return allowed


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing; expected the official python CIFAR-10 layout "
                        f"(cifar-10-python.tar.gz extracted: data_batch_1..5, test_batch, batches.meta)")
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise DataError(f"{path}: not a CIFAR-10 python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python pickle (holds a {type(obj).__name__}, not a dict)")
    return obj


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (keys {sorted(batch)}; expected b'data' and b'labels')")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: not a CIFAR-10 batch (data {data.dtype} {data.shape}, {len(labels)} labels; "
                        f"expected uint8 (N, 3072) and N labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    # Rows are 1024 red, then green, then blue values of a 32x32 image.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar10(src) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """``cifar-10-batches-py`` (or its parent) -> ((train_x, train_y), (test_x, test_y), classes).

    Images are uint8 [N, 32, 32, 3] RGB, labels int64 [N].
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: CIFAR-10 folder not found; expected cifar-10-batches-py/ "
                        f"(cifar-10-python.tar.gz extracted)")
    if (src / "cifar-10-batches-py").is_dir():
        src = src / "cifar-10-batches-py"
    meta = _load_pickle(src / "batches.meta")
    if b"label_names" not in meta:
        raise DataError(f"{src / 'batches.meta'}: no b'label_names' entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    train = [_cifar_batch(src / f"data_batch_{i}") for i in range(1, 6)]
    train_x, train_y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    return (train_x, train_y), _cifar_batch(src / "test_batch"), classes


# ---------------------------------------------------------------------------- demo (Fashion-MNIST)

def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing; install the full set with `apt-get install -y dataset-fashion-mnist`")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .gz file ({err})") from err
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file (expected magic number {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} bytes of data, header says {shape})")
    return data.reshape(shape)


def read_fashion_mnist(src=DEMO_SRC) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST IDX files -> ((train_x, train_y), (test_x, test_y)) as 28x28 uint8 + int64."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: Fashion-MNIST not found; install it with `apt-get install -y dataset-fashion-mnist`")
    splits = []
    for prefix in ("train", "t10k"):
        x = _read_idx(src / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)
        y = _read_idx(src / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801).astype(np.int64)
        if len(x) != len(y) or x.shape[1:] != (28, 28):
            raise DataError(f"{src}: {prefix} images {x.shape} do not match {len(y)} labels of 28x28 images")
        splits.append((x, y))
    return splits[0], splits[1]


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """[N, 28, 28] grey -> [N, 32, 32, 3]: zero-pad 2 px a side and repeat to 3 channels,
    so the demo runs through the CIFAR-shaped networks unchanged."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3)


# ---------------------------------------------------------------------------- array sets

class ArrayImages:
    """Indexable (HxWx3 uint8, label) over in-memory arrays (shared with forked writers)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def _write_arrays(out_dir: Path, dataset: str, classes: list[str], train, test, src, *,
                  val_size, seed, overwrite, num_workers) -> dict:
    import data_pipeline.ffcv_import  # noqa: F401  (first: see its docstring)
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    train_idx, val_idx = carve_val(len(train[0]), val_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (x, y), indices in (("train", train, train_idx), ("val", train, val_idx), ("test", test, None)):
        print(f"writing {out_dir / f'{split}.beton'} ({len(x) if indices is None else len(indices):,} images)")
        write_beton(out_dir / f"{split}.beton", ArrayImages(x, y), fields, indices=indices,
                    num_workers=num_workers or default_workers(), overwrite=overwrite)
    return _finish(out_dir, dataset, classes, src, val_size, seed, {"write_mode": "raw"})


def write_cifar10(src, out_dir, *, val_size: int | float = 5000, seed: int = 0, overwrite: bool = False,
                  num_workers: int | None = None) -> dict:
    """CIFAR-10 python batches -> ``out_dir`` (raw 32x32 RGB, bit-exact). Returns the meta dict."""
    out_dir = Path(out_dir)
    refuse_existing(_outputs(out_dir), overwrite)
    train, test, classes = read_cifar10(src)
    return _write_arrays(out_dir, "cifar10", classes, train, test, src, val_size=val_size, seed=seed,
                         overwrite=overwrite, num_workers=num_workers)


def write_demo(src=DEMO_SRC, out_dir="data/demo", *, val_size: int | float = 5000, seed: int = 0,
               overwrite: bool = False, num_workers: int | None = None) -> dict:
    """Full Fashion-MNIST (60k train / 10k test) as 32x32x3 raw images -> ``out_dir``.

    The set is written into ``<out_dir>.partial-<pid>`` and renamed to ``out_dir`` once
    complete: a crash leaves no half-written set under the name runs read."""
    out_dir = Path(out_dir)
    refuse_existing(_outputs(out_dir), overwrite)
    (train_x, train_y), (test_x, test_y) = read_fashion_mnist(src)
    with _atomic_dir(out_dir) as tmp:
        return _write_arrays(tmp, "demo", DEMO_CLASSES, (to_rgb32(train_x), train_y),
                             (to_rgb32(test_x), test_y), src, val_size=val_size, seed=seed,
                             overwrite=overwrite, num_workers=num_workers)


def demo_missing(out_dir) -> list[str]:
    """The split files a demo set in ``out_dir`` lacks: [] when it is complete."""
    return [f"{s}.beton" for s in SPLITS if not (Path(out_dir) / f"{s}.beton").is_file()]


def ensure_demo(out_dir, *, seed: int = 0) -> None:
    """Write the demo set to ``out_dir`` unless it is complete. A set missing split files
    (left by an interrupted write before writes were atomic) is written again, said in one
    line; a folder that also holds files of someone else's is refused, never replaced."""
    out_dir = Path(out_dir)
    missing = demo_missing(out_dir)
    if not missing:
        return
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present:
        ours = {p.name for p in _outputs(out_dir)}
        foreign = [n for n in present if n not in ours and not n.startswith(".")]  # .x.tmp: atomic writes'
        if foreign:
            raise DataError(f"{out_dir}: incomplete demo set ({', '.join(missing)} missing) beside other "
                            f"files ({foreign[0]}, ...): not rewritten; move them or choose another data.data_dir")
        print(f"{out_dir}: the demo set is incomplete ({', '.join(missing)} missing: an earlier write "
              f"was interrupted); writing it again", flush=True)
    else:
        print(f"writing the demo data set to {out_dir} (once)", flush=True)
    write_demo(out_dir=out_dir, seed=seed, overwrite=True)


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` that replaces it when the block ends cleanly.
    Folders that writers killed earlier left behind (their pid is gone) are removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{out_dir.name}.partial-"
    for stale in out_dir.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():  # overwrite: move the old set aside, then drop it
            old = tmp.with_name(f"{tmp.name}-old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


# ---------------------------------------------------------------------------- common

def _outputs(out_dir: Path, *extra: str) -> list[Path]:
    return [out_dir / f"{s}.beton" for s in SPLITS] + [out_dir / "meta.json"] + [out_dir / e for e in extra]


def _finish(out_dir: Path, dataset: str, classes: list[str], src, val_size, seed, settings: dict,
            skipped: list | None = None) -> dict:
    """Write meta.json from what the .beton files actually hold, print a summary, return it."""
    from data_pipeline.inspect import beton_summary

    summaries = {s: beton_summary(out_dir / f"{s}.beton") for s in SPLITS}
    meta = {
        "dataset": dataset,
        "source": str(Path(src).resolve()),
        "classes": classes,
        "num_classes": len(classes),
        "counts": {s: summaries[s]["num_samples"] for s in SPLITS},
        "image_height": [min(summaries[s]["image_height"][0] for s in SPLITS),
                         max(summaries[s]["image_height"][1] for s in SPLITS)],
        "image_width": [min(summaries[s]["image_width"][0] for s in SPLITS),
                        max(summaries[s]["image_width"][1] for s in SPLITS)],
        "val": {"size": val_size, "seed": seed, "carved_from": "train"},
        "write": settings,
    }
    if skipped is not None:
        meta["skipped"] = skipped
    write_json_atomic(out_dir / "meta.json", meta)
    counts = ", ".join(f"{s} {n:,}" for s, n in meta["counts"].items())
    note = f"; skipped {len(skipped)} unreadable image(s), listed in meta.json" if skipped else ""
    print(f"{dataset}: {counts} samples, {len(classes)} classes -> {out_dir}{note}")
    return meta

