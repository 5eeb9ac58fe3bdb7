"""What is in a .beton, and is it a complete FFCV file.

``python -m data_pipeline.inspect FILE.beton [--json]`` prints the number of samples, the
fields, the label histogram and the range of image sizes. ``open_beton`` is also what the
loaders call first: FFCV's own reader silently reads short arrays from a truncated file and
only fails (or returns garbage) later, deep in a compiled pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from data_pipeline import DataError

# Fields whose samples live in the data region (their metadata points into it).
_DATA_FIELDS = ("RGBImageField", "NDArrayField", "BytesField", "JSONField", "TorchTensorField")


def open_beton(path: str | os.PathLike):
    """Validate ``path`` as a complete FFCV .beton and return its ``ffcv.reader.Reader``.

    Raises DataError naming the file for: a missing file, a non-FFCV file, a file cut short.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType
    from ffcv.writer import MIN_PAGE_SIZE

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .beton file (write it with python -m data_pipeline.write)")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise DataError(f"{path}: not an FFCV .beton ({size} bytes, shorter than the header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise DataError(f"{path}: not an FFCV .beton (format version {header['version']}, "
                        f"expected {CURRENT_VERSION})")
    page_size, num_fields = int(header["page_size"]), int(header["num_fields"])
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1) or num_fields == 0:
        raise DataError(f"{path}: not an FFCV .beton (page size {page_size}, {num_fields} fields)")
    fields_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if size < fields_end:
        raise DataError(f"{path}: truncated FFCV .beton (field table ends at byte {fields_end}, "
                        f"file has {size})")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    unknown = sorted({int(t) for t in descriptors["type_id"] if TYPE_ID_HANDLER.get(int(t)) is None})
    if unknown:
        raise DataError(f"{path}: not a readable FFCV .beton (unknown field type ids {unknown})")

    table_ptr = int(header["alloc_table_ptr"])
    if table_ptr == 0 or table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(f"{path}: truncated or unfinished FFCV .beton (allocation table at byte "
                        f"{table_ptr}, file has {size} bytes)")
    reader = Reader(str(path))
    n = int(reader.num_samples)
    if n == 0:
        raise DataError(f"{path}: FFCV .beton holds no samples")
    if table_ptr < fields_end + n * reader.metadata_type.itemsize:
        raise DataError(f"{path}: corrupt FFCV .beton (allocation table overlaps the sample metadata)")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise DataError(f"{path}: corrupt FFCV .beton (sample data runs past the allocation table)")
    has_data = any(type(h).__name__ in _DATA_FIELDS for h in reader.handlers.values())
    if has_data and len(np.unique(table["sample_id"])) != n:
        raise DataError(f"{path}: truncated FFCV .beton (data of {n - len(np.unique(table['sample_id']))} "
                        f"of {n} samples missing)")
    return reader


def _describe(handler) -> str:
    name = type(handler).__name__
    if name == "NDArrayField":
        return f"{name}({np.dtype(handler.dtype).name}, {tuple(int(s) for s in handler.shape)})"
    return name


def beton_summary(path: str | os.PathLike) -> dict:
    """Summary of a .beton: samples, fields, label histogram, image sizes and storage modes."""
    reader = open_beton(path)
    summary: dict = {
        "file": str(path),
        "bytes": Path(path).stat().st_size,
        "num_samples": int(reader.num_samples),
        "fields": {name: _describe(h) for name, h in reader.handlers.items()},
    }
    for ix, (name, handler) in enumerate(reader.handlers.items()):
        column = reader.metadata[f"f{ix}"]
        kind = type(handler).__name__
        if kind == "IntField" and name == "label":
            labels, counts = np.unique(column, return_counts=True)
            summary["labels"] = {int(k): int(c) for k, c in zip(labels, counts)}
        elif kind == "RGBImageField":
            summary["image_height"] = [int(column["height"].min()), int(column["height"].max())]
            summary["image_width"] = [int(column["width"].min()), int(column["width"].max())]
            summary["image_modes"] = {"raw": int((column["mode"] == 1).sum()),
                                      "jpg": int((column["mode"] == 0).sum())}
    return summary


def format_table(summary: dict) -> str:
    """Human-readable version of ``beton_summary``."""
    rows = [("file", summary["file"]), ("size", f"{summary['bytes'] / 2**20:.1f} MiB"),
            ("samples", f"{summary['num_samples']:,}")]
    rows += [(f"field {name}", kind) for name, kind in summary["fields"].items()]
    if "image_height" in summary:
        (h0, h1), (w0, w1) = summary["image_height"], summary["image_width"]
        rows.append(("image size (HxW)", f"{h0}x{w0}" if (h0, w0) == (h1, w1) else f"{h0}..{h1} x {w0}..{w1}"))
        rows.append(("image storage", ", ".join(f"{k} {v:,}" for k, v in summary["image_modes"].items())))
    if "labels" in summary:
        counts = summary["labels"]
        rows.append(("classes", f"{len(counts)} (labels {min(counts)}..{max(counts)})"))
        rows += [(f"  label {k}", f"{v:,}") for k, v in counts.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="path to a .beton file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        summary = beton_summary(args.file)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
