"""Event readers and binning on a real DAVIS346 recording; CIFAR10-DVS writer and loader on a
labelled tree of real-format files whose events are simulated from real Fashion-MNIST images."""
import gzip
import hashlib
import importlib.util
import json
import os
import socket
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline import DataError
from data_pipeline.dvs_cifar10 import CLASS_NAMES, write_dvs_cifar10
from data_pipeline.event_augment import nda_augment
from data_pipeline.events import (EVENT_DTYPE, events_to_frames, read_events, write_aedat2,
                                  write_aedat4)
from data_pipeline.loaders import dvs_loaders

REPO = Path(__file__).resolve().parents[1]
DAVIS346 = REPO.parent / "shared" / "data" / "events" / "davis346.aedat4"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
T = 10
PER_CLASS = 4  # -> int(4 * 0.9) = 3 train and 1 test recordings per class
VAL_SIZE = 5


@pytest.fixture(scope="module")
def davis346():
    if not DAVIS346.is_file():
        warnings.warn(f"{DAVIS346} missing: the checks on a real DAVIS346 recording (decoding, "
                      "binning against SpikingJelly, AEDAT4 round trip, bad-file errors) do NOT run")
        pytest.skip(f"{DAVIS346} missing: real-recording checks not run (the recordings live in "
                    f"../shared/data/events/)")
    return read_events(DAVIS346)


@pytest.fixture(scope="module")
def spikingjelly():
    """SpikingJelly's own `datasets.utils` and `datasets.cifar10_dvs` as the reference.

    Its `datasets` package imports torchvision and h5py at import time, neither of which can be
    installed beside our CPU torch; the two modules we call need neither, so they are loaded
    with those imports stubbed, and the stubs and SpikingJelly's modules are taken out of
    sys.modules afterwards (only those: a module another library imported meanwhile, numba's
    lazily loaded compiler parts for one, must stay, or its next import registers twice).
    """
    spec = importlib.util.find_spec("spikingjelly")
    if spec is None:
        pytest.skip("spikingjelly is a test-only reference: bash install.sh --test")
    before = dict(sys.modules)

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {}) if name[0].isupper() else Stub(f"{self.__name__}.{name}")

    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets",
                 "torchvision.datasets.utils", "torchvision.datasets.folder"):
        sys.modules[name] = Stub(name)
    package = types.ModuleType("spikingjelly.datasets")
    package.__path__ = [str(Path(spec.origin).parent / "datasets")]
    sys.modules["spikingjelly.datasets"] = package
    try:
        from spikingjelly.datasets import cifar10_dvs, utils
        yield types.SimpleNamespace(utils=utils, cifar10_dvs=cifar10_dvs)
    finally:
        for name in set(sys.modules) - set(before):
            if name.split(".")[0] in ("spikingjelly", "torchvision"):
                del sys.modules[name]
        sys.modules.update(before)


def _events(t, x, y, p) -> np.ndarray:
    events = np.empty(len(t), dtype=EVENT_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t, x, y, p
    return events


# ---- readers and binning on the real recording ----

def test_davis346_reader_and_binning_conserve_counts(davis346):
    events, sensor_size = davis346
    assert (len(events), sensor_size) == (78_830, (260, 346))
    assert events.dtype == EVENT_DTYPE
    assert np.all(np.diff(events["t"]) >= 0)
    assert events["x"].max() < 346 and events["y"].max() < 260
    per_polarity = np.bincount(events["p"], minlength=2)
    for T_, split_by in [(1, "number"), (10, "number"), (16, "number"), (10, "time")]:
        frames = events_to_frames(events, T_, sensor_size, split_by)
        assert frames.shape == (T_, 2, 260, 346) and frames.dtype == np.float32
        np.testing.assert_array_equal(frames.sum(axis=(0, 2, 3)), per_polarity)
    sizes = events_to_frames(events, 10, sensor_size).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(sizes, [7883] * 9 + [78_830 - 9 * 7883])


@pytest.mark.parametrize("T_,split_by", [(1, "number"), (7, "number"), (10, "number"),
                                         (10, "time"), (16, "time")])
def test_binning_equals_spikingjelly(davis346, spikingjelly, T_, split_by):
    events, (H, W) = davis346
    as_dict = {k: events[k] for k in "txyp"}
    reference = spikingjelly.utils.integrate_events_by_fixed_frames_number(
        as_dict, split_by, T_, H, W)
    np.testing.assert_array_equal(events_to_frames(events, T_, (H, W), split_by), reference)


def test_binning_fewer_events_than_frames_equals_spikingjelly(davis346, spikingjelly):
    events, (H, W) = davis346
    few = events[:7]
    reference = spikingjelly.utils.integrate_events_by_fixed_frames_number(
        {k: few[k] for k in "txyp"}, "number", T, H, W)
    np.testing.assert_array_equal(events_to_frames(few, T, (H, W)), reference)


def test_aedat4_writer_round_trip(davis346, tmp_path):
    events, sensor_size = davis346
    path = tmp_path / "copy.aedat4"
    write_aedat4(path, events, sensor_size)
    back, back_size = read_events(path)
    assert back_size == sensor_size
    np.testing.assert_array_equal(back, events)


def test_aedat2_round_trip_and_spikingjelly_decoding(tmp_path, spikingjelly):
    rng = np.random.default_rng(0)
    n = 5000
    t = np.sort(rng.integers(0, 2**32, n))
    t[[0, -1]] = 0, 2**32 - 1
    x, y = rng.integers(0, 128, n), rng.integers(0, 128, n)
    x[:2], y[:2] = (0, 127), (127, 0)
    events = _events(t, x, y, rng.integers(0, 2, n))
    path = tmp_path / "cifar10_airplane_0.aedat"
    write_aedat2(path, events)

    raw = path.read_bytes()
    assert raw.startswith(b"#!AER-DAT2.0\r\n")
    body = raw[-8 * n:]
    assert all(line.startswith(b"#") for line in raw[:-8 * n].splitlines())
    assert int.from_bytes(body[4:8], "big") == t[0]  # big-endian address, then timestamp

    back, sensor_size = read_events(path)
    assert sensor_size == (128, 128)
    np.testing.assert_array_equal(back, events)
    reference = spikingjelly.cifar10_dvs._load_origin_data(path)  # what the reference trains on
    for key in "txyp":
        np.testing.assert_array_equal(back[key], reference[key])


def test_bad_event_files(tmp_path, davis346):
    with pytest.raises(DataError, match="no such event file"):
        read_events(tmp_path / "missing.aedat")
    (tmp_path / "x.dat").write_bytes(b"")
    with pytest.raises(DataError, match="unknown event file type '.dat'"):
        read_events(tmp_path / "x.dat")

    good = tmp_path / "good.aedat"
    write_aedat2(good, _events([1, 2, 3], [1, 2, 3], [4, 5, 6], [0, 1, 1]))
    truncated = tmp_path / "truncated.aedat"
    truncated.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated AEDAT 2.0"):
        read_events(truncated)
    old = tmp_path / "old.aedat"
    old.write_bytes(b"#!AER-DAT3.1\r\n#\r\n")
    with pytest.raises(DataError, match="unsupported jAER format AER-DAT3.1"):
        read_events(old)

    events, sensor_size = davis346
    full = tmp_path / "full.aedat4"
    write_aedat4(full, events, sensor_size)
    cut = tmp_path / "cut.aedat4"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(DataError, match="cannot decode AEDAT4"):
        read_events(cut)
    (tmp_path / "junk.aedat4").write_bytes(b"not an aedat4 file" * 8)
    with pytest.raises(DataError, match="wrong magic number"):
        read_events(tmp_path / "junk.aedat4")

    with pytest.raises(ValueError, match="outside the 128x128 sensor"):
        events_to_frames(events, T, (128, 128))
    with pytest.raises(ValueError, match="split_by"):
        events_to_frames(events, T, sensor_size, "count")
    with pytest.raises(ValueError, match="T must be"):
        events_to_frames(events, 0, sensor_size)


# ---- a labelled CIFAR10-DVS tree simulated from real images ----

def _fashion_mnist_by_class(per_class: int) -> list[np.ndarray]:
    """The first `per_class` test images of each of the 10 classes, uint8 [per_class, 28, 28]."""
    images_gz, labels_gz = (FASHION_MNIST / "t10k-images-idx3-ubyte.gz",
                            FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    if not images_gz.is_file():
        pytest.fail(f"{images_gz} missing: apt-get install -y dataset-fashion-mnist")
    images = np.frombuffer(gzip.open(images_gz).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(labels_gz).read(), np.uint8, offset=8)
    return [images[labels == k][:per_class] for k in range(10)]


def _saccade_events(image: np.ndarray, rng: np.random.Generator, *, periodic: bool) -> np.ndarray:
    """DVS events from moving a real image on a 128x128 'monitor', as CIFAR10-DVS was recorded.

    The image is upscaled to 96x96 and moved along a small triangular saccade path; a pixel fires
    an ON/OFF event when its log intensity moved by >= 0.15 since its last event. A periodic
    recording repeats one saccade T times, so its T equal-number frames are identical.
    """
    canvas = np.zeros((128, 128), np.float32)
    big = F.interpolate(torch.from_numpy(image / 255.0)[None, None].float(), size=(96, 96),
                        mode="bilinear", align_corners=False)[0, 0].numpy()
    canvas[16:112, 16:112] = big
    corners = np.array([(0, 0), (4, 2), (2, 5), (0, 0)])
    path = np.concatenate([np.linspace(a, b, 6, endpoint=False) for a, b in zip(corners, corners[1:])])
    log_ref = np.log(canvas + 0.05)
    chunks, step_us = [], 2000
    for k, (dy, dx) in enumerate(np.rint(path).astype(int)):
        log_now = np.log(np.roll(canvas, (dy, dx), axis=(0, 1)) + 0.05)
        change = log_now - log_ref
        fired = np.abs(change) >= 0.15
        y, x = np.nonzero(fired)
        t = k * step_us + np.sort(rng.integers(0, step_us, len(y)))
        order = np.argsort(t, kind="stable")
        chunks.append(_events(t[order], x[order], y[order], (change[fired] > 0)[order]))
        log_ref[fired] = log_now[fired]
    events = np.concatenate(chunks)
    if periodic:
        period = len(path) * step_us
        events = np.concatenate([_events(events["t"] + i * period, events["x"], events["y"],
                                         events["p"]) for i in range(T)])
    return events


@pytest.fixture(scope="module")
def dvs_tree(tmp_path_factory):
    """CIFAR10-DVS layout in both releases' formats; class 0's recordings are periodic."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar10_dvs")
    events_of = {}
    for label, images in enumerate(_fashion_mnist_by_class(PER_CLASS)):
        name = CLASS_NAMES[label]
        for i, image in enumerate(images):
            events = _saccade_events(image, rng, periodic=label == 0)
            assert len(events) > 1000
            for suffix, write in (("aedat", write_aedat2),
                                  ("aedat4", lambda p, e: write_aedat4(p, e, (128, 128)))):
                folder = root / suffix / name
                folder.mkdir(parents=True, exist_ok=True)
                write(folder / f"cifar10_{name}_{i}.{suffix}", events)
            events_of[f"{name}/cifar10_{name}_{i}"] = events
    return root, events_of


@pytest.fixture(scope="module")
def dvs_written(dvs_tree):
    root, _ = dvs_tree
    out = root / "beton_aedat"
    meta = write_dvs_cifar10(root / "aedat", out, T=T, val_size=VAL_SIZE, seed=0)
    return out, meta


def _read_all(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def test_write_layout_and_meta(dvs_written, dvs_tree):
    out, meta = dvs_written
    assert {p.name for p in out.iterdir()} == {"train.beton", "val.beton", "test.beton", "meta.json"}
    assert json.loads((out / "meta.json").read_text()) == meta
    n_train = int(PER_CLASS * 0.9)
    assert meta["counts"] == {"train": 10 * n_train - VAL_SIZE, "val": VAL_SIZE,
                              "test": 10 * (PER_CLASS - n_train)}
    # The first 90 % of each class (sorted names) feed train + val; the last 10 % are test.
    assert meta["files"]["test"] == [f"{c}/cifar10_{c}_{PER_CLASS - 1}.aedat" for c in CLASS_NAMES]
    assert not set(meta["files"]["train"]) & set(meta["files"]["val"])
    again = write_dvs_cifar10(dvs_tree[0] / "aedat", out.parent / "again", T=T,
                              val_size=VAL_SIZE, seed=0)
    assert again["files"] == meta["files"]  # the seeded val carve is reproducible


def test_every_sample_reads_back_exactly(dvs_written, dvs_tree):
    out, meta = dvs_written
    _, events_of = dvs_tree
    loaders = dvs_loaders(out, batch_size=4, order="sequential", image_size=128, augment=False,
                          drop_last=False)
    for split in ("train", "val", "test"):
        x, y = _read_all(loaders[split])
        files = meta["files"][split]
        assert x.shape == (len(files), T, 2, 128, 128) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        for i, name in enumerate(files):
            class_name = name.split("/")[0]
            assert y[i].item() == CLASS_NAMES.index(class_name)
            expected = events_to_frames(events_of[name.removesuffix(".aedat")], T, (128, 128))
            np.testing.assert_array_equal(x[i].numpy(), expected)


def test_aedat4_tree_gives_the_same_frames(dvs_written, dvs_tree):
    out, meta = dvs_written
    root, _ = dvs_tree
    meta4 = write_dvs_cifar10(root / "aedat4", root / "beton_aedat4", T=T, val_size=VAL_SIZE,
                              seed=0)
    assert [f.replace(".aedat4", ".aedat") for f in meta4["files"]["test"]] == meta["files"]["test"]
    kw = dict(batch_size=5, order="sequential", image_size=128, augment=False)
    x2, y2 = _read_all(dvs_loaders(out, **kw)["test"])
    x4, y4 = _read_all(dvs_loaders(root / "beton_aedat4", **kw)["test"])
    assert torch.equal(x2, x4) and torch.equal(y2, y4)


def test_loader_resizes_and_augments_per_sample(dvs_written):
    out, meta = dvs_written
    exact = dvs_loaders(out, batch_size=4, order="sequential", image_size=128, augment=False)
    loaders = dvs_loaders(out, batch_size=4, order="sequential", drop_last=False)
    x_test, _ = _read_all(loaders["test"])
    x_full, _ = _read_all(exact["test"])
    assert x_test.shape == (10, T, 2, 48, 48)
    resized = F.interpolate(x_full.flatten(1, 2), size=(48, 48), mode="bilinear",
                            align_corners=False, antialias=True).view_as(x_test)
    torch.testing.assert_close(x_test, resized, rtol=0, atol=1e-5)

    x_aug, y_aug = _read_all(loaders["train"])
    x_plain, _ = _read_all(dvs_loaders(out, batch_size=4, order="sequential", augment=False,
                                       drop_last=False)["train"])
    assert x_aug.shape == x_plain.shape == (meta["counts"]["train"], T, 2, 48, 48)
    periodic = y_aug == 0
    assert periodic.sum() >= 2
    # One draw per sample for all T: identical input frames stay identical after augmentation.
    assert torch.equal(x_aug[periodic], x_aug[periodic][:, :1].expand_as(x_aug[periodic]))
    assert torch.equal(x_plain[periodic], x_plain[periodic][:, :1].expand_as(x_plain[periodic]))
    changed = (x_aug != x_plain).flatten(1).any(1)
    assert changed.float().mean() > 0.5


def test_loader_order_and_drop_last(dvs_written):
    out, meta = dvs_written
    n_train = meta["counts"]["train"]
    loaders = dvs_loaders(out, batch_size=4, seed=3)
    assert len(loaders["train"]) == n_train // 4  # drop_last=None drops the partial train batch
    assert len(loaders["test"]) == 3  # ... but never an evaluation sample
    _, y = _read_all(dvs_loaders(out, batch_size=4, seed=3, drop_last=False)["train"])
    expected = sorted(CLASS_NAMES.index(f.split("/")[0]) for f in meta["files"]["train"])
    assert sorted(y.tolist()) == expected


def _fingerprints(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(sample.numpy().tobytes()).hexdigest() for sample in x]


def _distributed_rank(rank: int, world_size: int, port: int, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        loaders = dvs_loaders(data_dir, batch_size=4, distributed=True, image_size=128,
                              augment=False, drop_last=False)
        shards = {split: _fingerprints(_read_all(loaders[split])[0]) for split in loaders}
        Path(out, f"rank{rank}.json").write_text(json.dumps(shards))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_read_disjoint_shards(dvs_written, tmp_path):
    out, meta = dvs_written
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_rank, args=(2, port, str(out), str(tmp_path)),
                                nprocs=2)
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole = dvs_loaders(out, batch_size=4, order="sequential", image_size=128, augment=False,
                        drop_last=False)
    for split, n in meta["counts"].items():
        everything = set(_fingerprints(_read_all(whole[split])[0]))
        a, b = shards[0][split], shards[1][split]
        assert set(a) | set(b) == everything
        if split == "train":  # FFCV's sharding pads so that every rank takes as many steps
            assert len(a) == len(b) == (n + 1) // 2
        else:  # evaluation is split exactly
            assert len(a) + len(b) == n and not set(a) & set(b)


def test_nda_augment_is_one_transform_per_sample():
    generator = torch.Generator().manual_seed(0)
    frame = torch.rand(16, 1, 2, 48, 48)
    x = frame.expand(16, T, 2, 48, 48).contiguous()
    out = nda_augment(x, generator)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, out[:, :1].expand_as(out))
    again = nda_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_bad_trees_and_outputs(tmp_path, dvs_tree, dvs_written):
    root, _ = dvs_tree
    with pytest.raises(DataError, match="no such folder.*figshare"):
        write_dvs_cifar10(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "partial" / "airplane").mkdir(parents=True)
    with pytest.raises(DataError, match="missing class folder"):
        write_dvs_cifar10(tmp_path / "partial", tmp_path / "out")

    mixed = tmp_path / "mixed"
    for name in CLASS_NAMES:
        (mixed / name).mkdir(parents=True)
        for f in (root / "aedat" / name).iterdir():
            (mixed / name / f.name).write_bytes(f.read_bytes())
    extra = mixed / "truck" / "cifar10_truck_9.aedat4"
    extra.write_bytes((root / "aedat4" / "truck" / "cifar10_truck_0.aedat4").read_bytes())
    with pytest.raises(DataError, match="both .aedat and .aedat4"):
        write_dvs_cifar10(mixed, tmp_path / "out")
    extra.unlink()

    broken = mixed / "truck" / "cifar10_truck_1.aedat"
    broken.write_bytes(broken.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated AEDAT 2.0"):
        write_dvs_cifar10(mixed, tmp_path / "out", val_size=VAL_SIZE)
    assert not list((tmp_path / "out").glob("*.beton"))

    with pytest.raises(DataError, match="cannot be split"):
        write_dvs_cifar10(mixed, tmp_path / "out", train_fraction=0.2)
    with pytest.raises(DataError, match="already exists"):
        write_dvs_cifar10(root / "aedat", dvs_written[0])
    with pytest.raises(DataError, match="no train/val/test .beton"):
        dvs_loaders(tmp_path, batch_size=4)
    with pytest.raises(DataError, match="quasi_random' is not supported with distributed"):
        dvs_loaders(dvs_written[0], batch_size=4, order="quasi_random", distributed=True)
