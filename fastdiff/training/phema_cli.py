"""``fastdiff phema``: post-hoc EMA reconstruction from the EMA snapshots a training run stored.

    fastdiff phema --indir runs/00000 --outstd 0.05,0.07,0.10 --outdir phema/

Reads every ``kind: ema`` snapshot in ``--indir`` once, however many target stds are asked for, and writes
one network file per target (``phema-<nimg>-<std>.safetensors``, loadable with ``fastdiff.io.load_network``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from fastdiff.training.phema import MAX_STD, solve_posthoc_coefficients, std_to_exp
from fastdiff.training.snapshots import list_snapshots, load_snapshot_tensors, save_tensors, snapshot_name
from fastdiff.training.units import parse_nimg

__all__ = ["add_arguments", "main", "reconstruct_phema"]


def _parse_stds(text: str) -> list[float]:
    try:
        stds = [float(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.05,0.10, got {text!r}")
    if not stds:
        raise argparse.ArgumentTypeError("expected at least one std")
    for s in stds:
        if not 0 < s <= MAX_STD:
            raise argparse.ArgumentTypeError(f"each std must lie in (0, {MAX_STD:.4f}], got {s}")
    return stds


def reconstruct_phema(indir, out_stds, outdir, out_nimg=None, in_stds=None, device="cpu", progress=True,
                      verbose=True) -> list[str]:
    """Reconstruct the EMAs ``out_stds`` at training time ``out_nimg`` (default: the latest snapshot) from the
    snapshots in ``indir``; write them to ``outdir``; return the written paths."""
    from fastdiff.training.phema import combine_snapshots

    snaps = list_snapshots(indir)
    if in_stds is not None:
        keep = {round(float(s), 6) for s in in_stds}
        snaps = [s for s in snaps if round(s.std, 6) in keep]
    if not snaps:
        raise FileNotFoundError(f"{indir}: no EMA snapshots (network-snapshot-*.safetensors written by training)")
    if out_nimg is None:
        out_nimg = max(s.nimg for s in snaps)
    out_nimg = int(out_nimg)
    snaps = [s for s in snaps if 0 < s.nimg <= out_nimg]
    if not snaps:
        raise ValueError(f"{indir}: no snapshots at or before {out_nimg} images")
    out_stds = [float(s) for s in out_stds]
    coefs = solve_posthoc_coefficients([s.nimg for s in snaps], [s.std for s in snaps], out_nimg, out_stds)
    if verbose:
        print(f"phema: {len(snaps)} snapshots from {indir}, {len(out_stds)} targets at {out_nimg} images",
              file=sys.stderr)

    def stream():
        it = snaps
        if progress:
            from tqdm import tqdm

            it = tqdm(snaps, desc="phema", unit="snapshot", file=sys.stderr)
        for s in it:
            yield load_snapshot_tensors(s.path, device=device)

    outs = combine_snapshots(stream(), coefs)
    base = dict(snaps[-1].config)
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for j, (std, tensors) in enumerate(zip(out_stds, outs)):
        config = dict(base)
        config["extra"] = {
            "kind": "phema", "nimg": out_nimg, "std": std, "exponent": float(std_to_exp(std)),
            "num_inputs": len(snaps), "max_abs_coef": float(np.abs(coefs[:, j]).max()),
        }
        path = os.path.join(outdir, snapshot_name(out_nimg, std, prefix="phema"))
        save_tensors(tensors, path, config)
        paths.append(path)
        if verbose:
            print(f"phema: wrote {path}", file=sys.stderr)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indir", required=True, help="training run folder with network-snapshot-*.safetensors")
    parser.add_argument("--outstd", required=True, type=_parse_stds,
                        help="target relative stds, comma-separated (e.g. 0.05,0.07,0.10)")
    parser.add_argument("--outdir", required=True, help="where to write phema-*.safetensors")
    parser.add_argument("--outnimg", type=parse_nimg, default=None,
                        help="training time of the reconstruction in images (e.g. 64Mi; default: latest snapshot)")
    parser.add_argument("--instd", type=_parse_stds, default=None,
                        help="use only snapshots of these tracked stds (default: all)")
    parser.add_argument("--device", default="cpu", help="where to accumulate (cpu or cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    try:
        reconstruct_phema(args.indir, args.outstd, args.outdir, out_nimg=args.outnimg, in_stds=args.instd,
                          device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastdiff phema: error: {exc}", file=sys.stderr)
        return 1
    return 0
