"""``fastdiff dataset``: prepare training data.

    fastdiff dataset convert --source photos/ --dest data-64.zip --resolution 64 --transform center-crop
    fastdiff dataset convert --source builtin:digits --dest digits-16.zip
    fastdiff dataset convert --source imagenet/train --dest img512.zip --resolution 512 --transform center-crop-dhariwal
    fastdiff dataset encode --data img512.zip --vae sd-vae-ft-mse/ --dest img512-sd.zip   # VAE mean/std latents
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
    enc = sub.add_parser("encode", help="image dataset -> latent dataset: the VAE's mean/std per image, as EDM2 "
                         "stores them (resumable: rerun the same command after a kill)")
    enc.add_argument("--data", required=True, help="image folder, zip or builtin:NAME (RGB, e.g. 512x512)")
    enc.add_argument("--vae", required=True, help="local VAE: a diffusers folder or a .safetensors file (never "
                     "downloaded; e.g. stabilityai/sd-vae-ft-mse fetched by hand)")
    enc.add_argument("--vae-config", default=None, help="diffusers config.json for a single-file VAE that is not "
                     "the Stable Diffusion VAE")
    enc.add_argument("--dest", required=True, help="output .zip (uncompressed) or folder")
    enc.add_argument("--batch", type=int, default=8, help="images per VAE call (default 8)")
    enc.add_argument("--chunk", type=int, default=1000, help="images per resumable chunk (default 1000)")
    enc.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    enc.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2; 0: none)")
    enc.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    enc.add_argument("--no-progress", action="store_true")
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
        elif args.action == "encode":
            from fastdiff._dist import resolve_device
            from fastdiff.data.latent import encode_dataset
            from fastdiff.vae import fingerprint, load_vae

            device = resolve_device(args.device)
            vae = load_vae(args.vae, device=device, batch_size=args.batch, config=args.vae_config)
            n = encode_dataset(args.data, args.dest, vae, batch=args.batch, chunk=args.chunk,
                               max_images=args.max_images, workers=args.workers, progress=not args.no_progress,
                               fingerprint=fingerprint(args.vae),
                               log=lambda msg: print(f"fastdiff dataset encode: {msg}", file=sys.stderr))
            print(f"wrote {n} latents to {args.dest}")
        elif args.action == "info":
            from fastdiff.data import open_dataset

            ds = open_dataset(args.data)
            if not args.quick and hasattr(ds, "validate"):
                ds.validate()
            print(ds.describe())
    except (DatasetError, FileNotFoundError, FileExistsError, ImportError, ValueError) as exc:
        print(f"fastdiff dataset: error: {exc}", file=sys.stderr)
        return 1
    return 0
