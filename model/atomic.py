"""One atomic write for every file the project leaves on disk.

A reader (a resumed run, another rank, the MLflow upload, a user's tool) sees the old file or
the complete new one, never a torn one: the data goes to a temp file beside the target, which
then replaces it in one rename. `fsync=True` also makes it survive a power cut (checkpoints);
the rest only needs to survive the process being killed. Here in model/ because every floor
writes files and model/ imports nothing of the others.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

Data = bytes | str | Callable[[BinaryIO], Any]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: Data, *, fsync: bool = False) -> Path:
    """Write bytes, text (UTF-8) or whatever `data(fileobj)` writes to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode())
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` for writers that open the file themselves (FFCV's); it
    replaces `path` when the block ends cleanly and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, fsync: bool = False) -> Path:
    """torch.save through `atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), fsync=fsync)
