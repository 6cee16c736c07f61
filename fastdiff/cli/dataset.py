"""``fastdiff dataset``: prepare training data.

    fastdiff dataset convert --source photos/ --dest data-64.zip --resolution 64 --transform center-crop
    fastdiff dataset convert --source builtin:digits --dest digits-16.zip
    fastdiff dataset info --data data-64.zip
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    conv = sub.add_parser("convert", help="image folder / built-in data -> training zip or folder (PNG + dataset.json)")
    conv.add_argument("--source", required=True, help="image folder (subfolders = classes, or a dataset.json), "
                      "a dataset zip, or builtin:digits / builtin:mnist / builtin:shapes")
    conv.add_argument("--dest", required=True, help="output .zip (uncompressed) or folder")
    conv.add_argument("--resolution", type=int, default=None, help="output size (square); default: keep")
    from fastdiff.data.convert import TRANSFORMS

    conv.add_argument("--transform", choices=TRANSFORMS, default="center-crop",
                      help="how to make images square and sized (default center-crop)")
    conv.add_argument("--channels", type=int, choices=(1, 3, 4), default=3, help="output channels (default 3)")
    conv.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    conv.add_argument("--no-progress", action="store_true")
    info = sub.add_parser("info", help="describe a dataset and check every file")
    info.add_argument("--data", required=True, help="folder, zip or builtin:NAME")
    info.add_argument("--quick", action="store_true", help="do not read every file")


def main(args) -> int:
    from fastdiff.data.dataset import DatasetError

    try:
        if args.action == "convert":
            from fastdiff.data.convert import convert_dataset

            n = convert_dataset(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                                channels=args.channels, max_images=args.max_images, progress=not args.no_progress)
            print(f"wrote {n} images to {args.dest}")
        elif args.action == "info":
            from fastdiff.data import open_dataset

            ds = open_dataset(args.data)
            if not args.quick and hasattr(ds, "validate"):
                ds.validate()
            print(ds.describe())
    except (DatasetError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"fastdiff dataset: error: {exc}", file=sys.stderr)
        return 1
    return 0
