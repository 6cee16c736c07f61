"""``fastdiff phema``: post-hoc EMA reconstruction from the EMA snapshots a training run stored.

    fastdiff phema --indir runs/00000 --outstd 0.05,0.07,0.10 --outdir phema/

Reads every ``kind: ema`` snapshot in ``--indir`` once, however many target stds are asked for, and writes
one network file per target (``phema-<nimg>-<std>.safetensors``, loadable with ``fastdiff.io.load_network``).
"""

from __future__ import annotations

import argparse
import sys

from fastdiff.cli.common import parse_stds, prepare_outdir
from fastdiff.training.phema import reconstruct_phema
from fastdiff.training.units import parse_nimg

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indir", required=True, help="training run folder with network-snapshot-*.safetensors")
    parser.add_argument("--outstd", required=True, type=parse_stds,
                        help="target relative stds, comma-separated (e.g. 0.05,0.07,0.10)")
    parser.add_argument("--outdir", required=True, help="where to write phema-*.safetensors")
    parser.add_argument("--outnimg", type=parse_nimg, default=None,
                        help="training time of the reconstruction in images (e.g. 64Mi; default: latest snapshot)")
    parser.add_argument("--instd", type=parse_stds, default=None,
                        help="use only snapshots of these tracked stds (default: all)")
    parser.add_argument("--device", default="cpu", help="where to accumulate (cpu or cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    try:
        prepare_outdir(args.outdir, create=False)
        reconstruct_phema(args.indir, args.outstd, args.outdir, out_nimg=args.outnimg, in_stds=args.instd,
                          device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastdiff phema: error: {exc}", file=sys.stderr)
        return 1
    return 0
