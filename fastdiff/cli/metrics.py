"""``fastdiff metrics``: reference statistics and FID / FD_DINOv2 / precision-recall / KID.

    fastdiff metrics ref  --data DIR_OR_ZIP|builtin:digits --dest ref.npz [--detector inception] [--metrics fd,pr,kid]
    fastdiff metrics calc --images DIR_OR_ZIP --ref ref.npz [--metrics fid,pr,kid] [--out results.json]
    fastdiff metrics gen  --net net.safetensors --ref ref.npz [every guidance flag of fastdiff generate]

The standard protocol uses 50,000 images (``--num``, the default); finding fewer is an error unless ``--num``
is lowered explicitly. ``--num all`` uses every image. ``--ref`` also takes the official EDM2 dataset-refs
pickles (read without running code from them; ``--metrics fid`` / ``fd_dinov2`` picks which).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from fastdiff.metrics._util import atomic_write
from fastdiff.metrics.detectors import available_detectors
from fastdiff.metrics.evaluate import (DEFAULT_MAX_FEATURES, DEFAULT_NUM, calc_from_images, make_reference,
                                       requested_detector, resolve_metrics)
from fastdiff.metrics.images import open_images
from fastdiff.metrics.stats import load_reference

__all__ = ["add_arguments", "main"]


def _num(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("feature extraction")
    g.add_argument("--detector", default=None,
                   help=f"feature network: {', '.join(available_detectors())} (default: the reference's, "
                        "implied by --metrics, else inception)")
    g.add_argument("--metrics", default="fd",
                   help="comma-separated: fd (Frechet distance in the detector's space; also spelled fid or "
                        "fd_dinov2, which select the detector), pr (precision/recall), kid (default: fd)")
    g.add_argument("--num", type=_num, default=DEFAULT_NUM, metavar="N|all",
                   help=f"number of images (default {DEFAULT_NUM:,}; fewer found is an error; more: a seeded "
                        "random subset)")
    g.add_argument("--batch", type=int, default=64, help="images per detector batch (default 64)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="detector weights file (else $FASTDIFF_INCEPTION / $FASTDIFF_DINOV2, then the defaults)")
    g.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2; 0: none)")
    g.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES, metavar="K",
                   help=f"raw features kept for pr/kid (default {DEFAULT_MAX_FEATURES:,})")
    g.add_argument("--seed", type=int, default=0, help="seed for subsets (default 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    common = _common_options()
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    p = sub.add_parser("ref", parents=[common], help="compute reference statistics of a dataset",
                       description="Compute reference statistics (.npz) of a folder or .zip of images. With "
                                   "--metrics including pr or kid the raw features are stored too.")
    p.add_argument("--data", required=True, metavar="DIR_OR_ZIP", help="folder (recursive) or .zip of PNG/JPG, or a "
                   "built-in dataset as fastdiff train takes it (builtin:digits, builtin:mnist, builtin:shapes)")
    p.add_argument("--dest", required=True, metavar="FILE.npz", help="output reference file")
    p = sub.add_parser("calc", parents=[common], help="metrics of a folder of images against a reference",
                       description="Compute metrics of a folder or .zip of images against reference statistics.")
    p.add_argument("--images", required=True, metavar="DIR_OR_ZIP", help="folder (recursive) or .zip of PNG/JPG")
    p.add_argument("--ref", required=True, metavar="FILE.npz",
                   help="reference statistics from `fastdiff metrics ref`, or an official EDM2 dataset-refs .pkl")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results as JSON")
    # Its own copy of the common options: set_defaults below changes the shared actions' defaults otherwise.
    p = sub.add_parser("gen", parents=[_common_options()], help="metrics of a network's samples, generated on the fly",
                       description="Generate images with a network (fastdiff.sampling.generate_images) and compute "
                                   "metrics on the fly, without writing images. --batch is both the sampling and the "
                                   "detector batch. --num defaults to the number of --seeds (else 50,000 seeds "
                                   "0..49999).")
    p.add_argument("--ref", required=True, metavar="FILE.npz",
                   help="reference statistics (.npz, or an official EDM2 dataset-refs .pkl)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results as JSON")
    p.add_argument("--net", required=True,
                   help="main network: fastdiff .safetensors or official EDM2 .pkl (fastdiff.io.load_any_network)")
    from fastdiff.cli.common import add_guidance_arguments, add_vae_arguments

    add_guidance_arguments(p)  # the same guidance flags as fastdiff generate (every method)
    add_vae_arguments(p)  # latent networks: --vae decodes before the detector
    p.add_argument("--sampler", default="heun", help="heun, euler, euler_ancestral, dpmpp_2m [default: heun]")
    p.add_argument("--steps", type=int, default=32, help="sampling steps [default: 32]")
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0-49999 or 1,5,10-12 [default: 0..num-1]")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="class label [default: random]")
    p.set_defaults(num=None)


def _format_table(results: dict[str, float]) -> str:
    width = max(len("metric"), *(len(k) for k in results))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {v:.6g}" if math.isfinite(v) else f"{k:<{width}}  {v}" for k, v in results.items()]
    return "\n".join(lines)


def _options(args) -> dict:
    return dict(metrics=args.metrics, num=args.num, device=args.device, batch_size=args.batch, weights=args.weights,
                workers=args.workers, max_features=args.max_features, seed=args.seed, progress=args.progress)


def _warn_if_biased(num: int, metrics: list[str], mode: str) -> None:
    """The Frechet distance's estimate from n images is biased (upward, more the smaller n): say so below the
    protocol's count."""
    if num < DEFAULT_NUM and "fd" in metrics:
        print(f"fastdiff metrics {mode}: warning: FID / FD from {num:,} images, fewer than the protocol's "
              f"{DEFAULT_NUM:,}, is biased (upward, the more the fewer images): compare it only with values computed "
              f"from the same number of images", file=sys.stderr)


def _run_ref(args) -> int:
    ref = make_reference(args.data, args.dest, detector=args.detector, **_options(args))
    extra = f", {len(ref.features):,} raw features" if ref.features is not None else ""
    print(f"wrote {args.dest}: {ref.detector} statistics of {ref.num_images:,} images "
          f"({ref.feature_dim}-d{extra})")
    return 0


def _run_calc(args) -> int:
    ref = load_reference(args.ref, requested_detector(args.metrics, args.detector))
    canonical, detector = resolve_metrics(args.metrics, args.detector, ref.detector)
    results = calc_from_images(args.images, ref, detector=detector, **_options(args))
    _warn_if_biased(args.num if args.num is not None else len(open_images(args.images)), canonical, "calc")
    print(_format_table(results))
    if args.out:
        record = dict(images=args.images, ref=args.ref, detector=detector, num=args.num, results=results)
        with atomic_write(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


def _run_gen(args) -> int:
    from fastdiff.io import load_any_network
    from fastdiff.metrics.evaluate import calc_from_generator
    from fastdiff.cli.common import build_guidance, check_network_files, make_vae_decoder, parse_guidance, parse_seeds
    from fastdiff.sampling.generate import generate_images

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    guidance_options = parse_guidance(args, has_gnet=args.gnet is not None)
    check_network_files(args, "net", "gnet")
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
        num = len(seeds) if args.num is None else args.num
        if num > len(seeds):
            raise ValueError(f"--num {num} but only {len(seeds)} seeds given; the standard protocol uses "
                             f"{DEFAULT_NUM:,} images (--seeds 0-{DEFAULT_NUM - 1})")
    else:
        num = DEFAULT_NUM if args.num is None else args.num
        seeds = list(range(num))
    ref = load_reference(args.ref, requested_detector(args.metrics, args.detector))
    canonical, detector = resolve_metrics(args.metrics, args.detector, ref.detector)
    net = load_any_network(args.net, device=args.device).requires_grad_(False)
    gnet = load_any_network(args.gnet, device=args.device).requires_grad_(False) if args.gnet is not None else None
    decoder, latent = make_vae_decoder(args, net, args.device)
    if latent and decoder is None:
        raise ValueError("the network makes latents: give --vae PATH (a local Stable Diffusion VAE) to decode them")
    guidance, summary = build_guidance(guidance_options, net, gnet)
    print(f"fastdiff metrics gen: guidance: {summary}", file=sys.stderr, flush=True)
    bad_seeds: list[int] = []
    images = generate_images(net, seeds[:num], guidance=guidance, sampler=args.sampler, steps=args.steps,
                             class_idx=args.class_idx, batch=args.batch, device=args.device, decoder=decoder,
                             on_nonfinite=bad_seeds.extend)
    with torch.inference_mode():
        results = calc_from_generator((batch for _seeds, batch in images), ref, metrics=args.metrics,
                                      detector=detector, num=num, device=args.device, batch_size=args.batch,
                                      weights=args.weights, max_features=args.max_features, seed=args.seed,
                                      progress=args.progress)
    if bad_seeds:  # as fastdiff generate: a diverged network's score is no result
        shown = ", ".join(map(str, bad_seeds[:20])) + (f" and {len(bad_seeds) - 20} more" if len(bad_seeds) > 20
                                                        else "")
        print(f"fastdiff metrics gen: error: {len(bad_seeds)} of {num} samples are not finite (NaN or Inf: the "
              f"network diverged), seeds {shown}; no metrics reported", file=sys.stderr)
        return 1
    _warn_if_biased(num, canonical, "gen")
    print(_format_table(results))
    if args.out:
        record = dict(net=args.net, gnet=args.gnet, vae=args.vae,
                      guidance=guidance_options.w,
                      guidance_setup=summary, interval=guidance_options.interval,
                      interval_steps=guidance_options.interval_steps,
                      sampler=args.sampler,
                      steps=args.steps, class_idx=args.class_idx, num=num, seeds=args.seeds or f"0-{num - 1}",
                      ref=args.ref, detector=detector, results=results)
        with atomic_write(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


def main(args: argparse.Namespace) -> int:
    run = {"ref": _run_ref, "calc": _run_calc, "gen": _run_gen}[args.mode]
    try:
        return run(args)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"fastdiff metrics {args.mode}: error: {e}", file=sys.stderr)
        return 1
