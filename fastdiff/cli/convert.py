"""``fastdiff convert``: an official EDM2 network pickle (or a ``torch.save`` file) -> a fastdiff network file.

    fastdiff convert edm2-img512-xs-2147483-0.135.pkl xs.safetensors
    fastdiff convert snapshot.pkl net.safetensors --key ema
    fastdiff convert snapshot.pkl --list

The file is read without running any code from it (``fastdiff.io.edm2_pickle``); the output is written
atomically with ``fastdiff.io.save_network`` and loads with ``fastdiff.io.load_network``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastdiff.io.edm2_pickle import jsonable as _jsonable
from fastdiff.io.safe_pickle import short_repr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official EDM2 .pkl, or a torch.save file (.pt/.pth) with a Precond state dict")
    parser.add_argument("dst", nargs="?", default=None, help="output fastdiff network file (.safetensors)")
    parser.add_argument("--key", default=None,
                        help="which entry of the file holds the network [default: 'ema' for .pkl files]")
    parser.add_argument("--list", action="store_true", help="only list the file's entries, convert nothing")
    parser.add_argument("--max-bytes", type=_size, default=None, metavar="N",
                        help="allow reading the file to allocate up to N bytes (e.g. 64G) [default: "
                             "8x the file's size]; only for a trusted file that needs more")


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t[-1:] in units and t[-1:] else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 8000000000 or 8G, got {text!r}") from None
    if not value >= 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative size, got {text!r}")
    return int(value)


def _list_entries(path, max_bytes) -> int:
    from fastdiff.io.safe_pickle import PersistentObject, read_plain

    raw = read_plain(path, max_bytes)
    entries = raw.items() if isinstance(raw, dict) else [("<root>", raw)]
    for key, value in entries:
        if isinstance(value, PersistentObject):
            kind = f"{value.class_name}({', '.join(f'{k}={short_repr(v)}' for k, v in value.init_kwargs.items())})"
        else:
            kind = type(value).__name__
        print(f"{key if isinstance(key, str) else short_repr(key)}: {kind}")
    return 0


def main(args) -> int:
    from fastdiff.io.network_file import save_network
    from fastdiff.io.any_network import load_network_and_info

    try:
        if args.list:
            return _list_entries(args.src, args.max_bytes)
        if args.dst is None:
            raise ValueError("give the output file (DST), or --list")
        if os.path.abspath(args.src) == os.path.abspath(args.dst):
            raise ValueError("the output file must differ from the input file")
        net, info = load_network_and_info(args.src, device="cpu", key=args.key, max_bytes=args.max_bytes)
        extra = {"converted_from": os.path.basename(args.src)}
        if args.key is not None:
            extra["key"] = args.key
        # The official pickles also carry the loss, the encoder and the dataset settings: keep what is plain.
        others = _jsonable(info)
        if others:
            extra["source_entries"] = others
        save_network(net, args.dst, extra=extra)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdiff convert: error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.dst}: {type(net).__name__} with {n:,} parameters, "
          f"{json.dumps(getattr(net, 'init_kwargs', {}))}")
    return 0
