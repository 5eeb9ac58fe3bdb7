"""Write a dataset to DIR/{train,val,test}.beton + DIR/meta.json.

    python -m data_pipeline.write imagenet --src /data/imagenet --out data/imagenet
    python -m data_pipeline.write cifar10 --src data/cifar-10-batches-py --out data/cifar10
    python -m data_pipeline.write demo --out data/demo
    python -m data_pipeline.write dvs-cifar10 --src data/CIFAR10DVS --out data/dvs_cifar10 --T 10

The val split is a seeded draw out of train (``--val-size``, ``--seed``); test is the
dataset's official held-out split. Bad input is one ``error:`` line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

from data_pipeline import DataError
from data_pipeline.images import DEMO_SRC, WRITE_MODES, default_workers


def _val_size(text: str) -> int | float:
    """'5000' -> 5000 samples, '0.1' -> a tenth of train."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.write", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def add(name: str, help: str, val_size: int, src_default=None):
        p = sub.add_parser(name, help=help)
        if src_default is None:
            p.add_argument("--src", required=True, help="source folder")
        else:
            p.add_argument("--src", default=str(src_default), help="source folder (default: %(default)s)")
        p.add_argument("--out", required=True, help="output folder for the .beton files and meta.json")
        p.add_argument("--val-size", type=_val_size, default=val_size,
                       help="validation samples carved from train: a count or a fraction (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default: %(default)s)")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.add_argument("--num-workers", type=int, default=default_workers(),
                       help="writer processes (default: %(default)s)")
        return p

    p = add("imagenet", "ImageNet, ImageFolder layout: SRC/train/<wnid>/*.JPEG, SRC/val/<wnid>/*.JPEG", 10000)
    p.add_argument("--max-resolution", type=int, default=500,
                   help="cap on the longer image side, in pixels (default: %(default)s)")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                   help="store images raw, as JPEG, or JPEG with --compress-probability (default: %(default)s)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of images stored as JPEG in proportion mode (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default: %(default)s)")
    p.add_argument("--subset", type=int, default=-1,
                   help="keep a draw (seeded by --seed) of N images from each of train/ and val/ (default: all)")
    p.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                   help="leave unreadable images out (listed in meta.json) or stop (default: %(default)s)")
    add("cifar10", "CIFAR-10, official python batches (cifar-10-batches-py)", 5000)
    add("demo", "full Fashion-MNIST padded to 32x32x3 (Debian dataset-fashion-mnist)", 5000, DEMO_SRC)
    p = add("dvs-cifar10", "CIFAR10-DVS event recordings binned into [T, 2, H, W] frames", 1000)
    p.add_argument("--T", type=int, default=10, help="time bins per sample (default: %(default)s)")
    return parser


def write(args: argparse.Namespace) -> dict:
    """Run the writer that ``args.dataset`` names; returns its meta dict."""
    common = dict(val_size=args.val_size, seed=args.seed, overwrite=args.overwrite, num_workers=args.num_workers)
    if args.dataset == "imagenet":
        from data_pipeline.images import write_imagenet
        return write_imagenet(args.src, args.out, max_resolution=args.max_resolution, write_mode=args.write_mode,
                              compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                              subset=args.subset, on_bad_image=args.on_bad_image, **common)
    if args.dataset == "cifar10":
        from data_pipeline.images import write_cifar10
        return write_cifar10(args.src, args.out, **common)
    if args.dataset == "demo":
        from data_pipeline.images import write_demo
        return write_demo(args.src, args.out, **common)
    from data_pipeline.dvs_cifar10 import write_dvs_cifar10
    return write_dvs_cifar10(args.src, args.out, T=args.T, **common)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        write(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
