"""``fastdiff generate``: images from a trained network, like the official EDM2 generate_images tool.

    fastdiff generate --net=net.safetensors --outdir=out --seeds=0-63 --batch=32
    fastdiff generate --net=big.safetensors --gnet=small.safetensors --guidance=2.0 --grid=grid.png
    fastdiff generate --net=net.safetensors --guidance-method=apg --guidance=4 --apg-rescale=15 --cads --outdir=out
    torchrun --nproc-per-node=4 -m fastdiff generate --net=... --seeds=0-49999 --subdirs --outdir=out

Under torchrun the seeds are split across the ranks. PNGs are written atomically; a sample holding NaN or Inf
is not written, its seed is named and the exit status is 1. Guidance, sampler and VAE flags: ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import torch

from fastdiff._dist import init_distributed, rank_and_world, resolve_device, shutdown_distributed
from fastdiff.cli.common import (DTYPES, GuidanceOptions, add_guidance_arguments, add_vae_arguments, build_guidance,
                                 check_network_files, image_path, make_grid, make_vae_decoder, parse_guidance,
                                 parse_seeds, prepare_outdir, save_npy, save_png)
from fastdiff.sampling.experts import Experts, parse_sigma_range
from fastdiff.sampling.generate import generate_images
from fastdiff.sampling.samplers import SAMPLERS, sampler_kwargs

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", default=None, help="main network: fastdiff .safetensors or official EDM2 .pkl "
                        "(required unless --expert networks cover every noise level)")
    parser.add_argument("--expert", action="append", default=[], metavar="NET:LO,HI",
                        help="expert denoiser for sigma in (LO, HI] (HI may be inf; repeatable): each evaluation goes "
                             "to the network of its noise level (eDiffi's ensemble of experts); --net, if given, "
                             "serves the noise levels no expert covers. Train one with `fastdiff train --init BASE "
                             "--sigma-range LO,HI`")
    parser.add_argument("--gexpert", action="append", default=[], metavar="NET:LO,HI",
                        help="the same for the guiding network (--gnet serves the rest, if given)")
    parser.add_argument("--sampler", default="heun", choices=SAMPLERS, help="[default: heun]")
    parser.add_argument("--steps", type=int, default=32, help="sampling steps [default: 32]")
    parser.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,10-12 [default: 0-63]")
    parser.add_argument("--class", dest="class_idx", type=int, default=None, help="class label [default: random]")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (per process) [default: 32]")
    parser.add_argument("--outdir", default=None, help="where to save the PNGs")
    parser.add_argument("--subdirs", action="store_true", help="one subdirectory per 1000 seeds")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also save all images as one grid image")
    parser.add_argument("--device", default=None, help="[default: cuda if available, else cpu]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="sampling dtype [default: float32]")
    parser.add_argument("--S-churn", dest="S_churn", type=float, default=0.0, help="stochasticity [default: 0]")
    parser.add_argument("--S-min", dest="S_min", type=float, default=0.0)
    parser.add_argument("--S-max", dest="S_max", type=float, default=float("inf"))
    parser.add_argument("--S-noise", dest="S_noise", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=None,
                        help="ancestral / SDE samplers: scale of the fresh noise [default: the sampler's]")
    parser.add_argument("--rtol", type=float, default=None, help="dpm_adaptive: relative tolerance [default: 0.05]")
    parser.add_argument("--atol", type=float, default=None, help="dpm_adaptive: absolute tolerance [default: 0.0078]")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the networks from captured CUDA graphs (fastdiff.sampling.cuda_graphed; CUDA only)")
    add_guidance_arguments(parser)
    add_vae_arguments(parser)


def parse_expert(spec: str) -> tuple[str, float, float]:
    """``'net.safetensors:lo,hi'`` -> ``(path, lo, hi)``."""
    path, sep, rng = str(spec).rpartition(":")
    if not sep or not path:
        raise ValueError(f"malformed --expert {spec!r}: expected NET:LO,HI, e.g. low.safetensors:0,1.5")
    lo, hi = parse_sigma_range(rng, f"--expert range in {spec!r}")
    return path, lo, hi


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """The command line of ``fastdiff generate``, parsed and checked once (:func:`parse_config`)."""

    net: str | None
    gnet: str | None
    experts: tuple[tuple[str, float, float], ...]
    gexperts: tuple[tuple[str, float, float], ...]
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    sampler_options: dict
    class_idx: int | None
    batch: int
    outdir: str | None
    subdirs: bool
    grid: str | None
    device: str | None
    dtype: torch.dtype
    progress: bool
    cuda_graphs: bool
    guidance: GuidanceOptions
    vae: str | None
    vae_device: str | None
    vae_batch: int


def parse_config(args: argparse.Namespace, has_gnet: bool | None = None) -> GenerateConfig:
    """Every check of the flags that needs no network file (ValueError naming the flag). ``has_gnet``:
    whether a guiding network is given (default: ``--gnet`` or ``--gexpert``)."""
    if getattr(args, "net", None) is None and not getattr(args, "expert", None):
        raise ValueError("no network: give --net and/or --expert NET:LO,HI")
    experts = tuple(parse_expert(spec) for spec in getattr(args, "expert", None) or ())
    gexperts = tuple(parse_expert(spec) for spec in getattr(args, "gexpert", None) or ())
    if args.outdir is None and args.grid is None:
        raise ValueError("nothing to write: give --outdir and/or --grid")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if has_gnet is None:
        has_gnet = getattr(args, "gnet", None) is not None or bool(gexperts)
    guidance = parse_guidance(args, has_gnet)
    sampler_options = _sampler_kwargs(args)
    return GenerateConfig(
        net=args.net, gnet=args.gnet, experts=experts, gexperts=gexperts, seeds=tuple(parse_seeds(args.seeds)),
        sampler=args.sampler, steps=args.steps, sampler_options=sampler_options, class_idx=args.class_idx,
        batch=args.batch, outdir=args.outdir, subdirs=args.subdirs, grid=args.grid, device=args.device,
        dtype=DTYPES[args.dtype], progress=getattr(args, "progress", True), cuda_graphs=getattr(args, "cuda_graphs",
                                                                                               False),
        guidance=guidance, vae=args.vae, vae_device=args.vae_device, vae_batch=args.vae_batch)


def _sampler_kwargs(args) -> dict:
    """The sampler options given on the command line, checked against --sampler."""
    extra = {k: getattr(args, k, None) for k in ("eta", "rtol", "atol")}
    extra = {k: v for k, v in extra.items() if v is not None}
    kw = dict(S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise, **extra)
    try:
        sampler_kwargs(args.sampler, **kw)
    except ValueError as exc:
        flags = {"S_churn": "--S-churn", "S_min": "--S-min", "S_max": "--S-max", "S_noise": "--S-noise", "eta": "--eta"}
        message = re.sub(r"(?<![\w-])(S_churn|S_min|S_max|S_noise|eta)[= ]", lambda m: flags[m.group(1)] + " ", str(exc))
        raise ValueError(message) from None
    return kw


def _remove_orphans(outdir: str) -> None:
    """Temporaries left in ``outdir`` (and its ``--subdirs`` folders) by a killed run: PNGs that never got
    their name."""
    from fastdiff._atomic import remove_orphan_temps

    folders = [outdir] + [os.path.join(outdir, d) for d in (os.listdir(outdir) if os.path.isdir(outdir) else ())
                          if re.fullmatch(r"\d{6}", d) and os.path.isdir(os.path.join(outdir, d))]
    removed = [p for folder in folders for p in remove_orphan_temps(folder)]
    if removed:
        print(f"fastdiff generate: removed {len(removed)} temporary file(s) left by a killed run "
              f"(e.g. {removed[0]})", file=sys.stderr, flush=True)


def run(config: GenerateConfig, net, gnet=None, decoder=None, latent: bool = False) -> int:
    """Generates and writes the images with already loaded networks (this rank's share under
    torch.distributed); rank 0 writes the grid. ``decoder``: latents -> uint8 images (a VAE's);
    ``latent`` without a decoder: write the raw latents as ``.npy`` files."""
    raw = latent and decoder is None
    if raw and config.grid is not None:
        raise ValueError("the network makes latents: a --grid needs pixels, give --vae PATH to decode them")
    seeds = list(config.seeds)
    guidance, summary = build_guidance(config.guidance, net, gnet)
    rank, world = rank_and_world()
    distributed = world > 1
    device = resolve_device(config.device)
    if rank == 0:
        print(f"fastdiff generate: guidance: {summary}", file=sys.stderr, flush=True)
        if raw:
            print("fastdiff generate: the network makes latents and no --vae was given: writing .npy latents "
                  "(give --vae PATH to decode them to PNGs)", file=sys.stderr, flush=True)
        for role, m in (("main", net), ("guide", gnet)):
            if isinstance(m, Experts):
                print(f"fastdiff generate: {role} network: {len(m)} experts, sigma ranges {m.extra_repr()[7:]}",
                      file=sys.stderr, flush=True)
        if config.outdir is not None:
            _remove_orphans(config.outdir)
    if distributed:
        torch.distributed.barrier()  # no rank writes before rank 0 has cleared the temporaries
    bad_seeds: set[int] = set()
    batches = generate_images(
        net, seeds, guidance=guidance, sampler=config.sampler, steps=config.steps,
        class_idx=config.class_idx, batch=config.batch, device=device, dtype=config.dtype, rank=rank, world_size=world,
        decoder=(lambda x: x.float().cpu()) if raw else decoder, on_nonfinite=bad_seeds.update,
        **config.sampler_options,
    )
    progress = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(seeds), unit="img", desc="generate")
    kept: list[tuple[int, torch.Tensor]] = []
    for batch_seeds, images in batches:
        if config.outdir is not None:
            for seed, img in zip(batch_seeds, images):
                if seed in bad_seeds:  # a NaN sample would be a black PNG that looks like a result
                    continue
                path = image_path(config.outdir, seed, config.subdirs)
                if raw:
                    save_npy(img, os.path.splitext(path)[0] + ".npy")
                else:
                    save_png(img, path)
        if config.grid is not None:
            kept.extend(zip(batch_seeds, images))
        if progress is not None:
            progress.update(len(batch_seeds) * world)
    if progress is not None:
        progress.close()
    if config.grid is not None:
        if distributed:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, kept)
            kept = [item for part in gathered for item in part]
        if rank == 0:
            kept.sort(key=lambda item: item[0])
            save_png(make_grid([img for _, img in kept]), config.grid)
    if distributed:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, sorted(bad_seeds))
        bad_seeds = {s for part in parts for s in part}
        torch.distributed.barrier()
    if bad_seeds:
        if rank == 0:
            listed = sorted(bad_seeds)
            shown = ", ".join(map(str, listed[:20])) + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")
            skipped = "; their PNGs were not written" if config.outdir is not None else ""
            tiles = "; their grid tiles are black" if config.grid is not None else ""
            print(f"fastdiff generate: error: {len(listed)} of {len(seeds)} samples are not finite (NaN or Inf: the "
                  f"network diverged), seeds {shown}{skipped}{tiles}", file=sys.stderr, flush=True)
        return 1
    return 0


def _with_experts(base, specs, load):
    """``base`` alone, or the ensemble of the parsed ``--expert`` specs (``base`` filling the uncovered ranges)."""
    if not specs:
        return base
    from fastdiff.sampling.experts import fill_gaps

    experts = [(lo, hi, load(path)) for path, lo, hi in specs]
    return Experts(fill_gaps(experts, base) if base is not None else experts)


def main(args) -> int:
    try:
        config = parse_config(args)
        check_network_files(config, "net", "gnet")
        for flag, specs in (("expert", config.experts), ("gexpert", config.gexperts)):
            for (path, _, _), spec in zip(specs, getattr(args, flag)):
                if not os.path.isfile(path):
                    raise ValueError(f"--{flag} {spec}: {path} " + ("is a folder, not a network file"
                                                                    if os.path.isdir(path) else "not found"))
        if config.outdir is not None:  # before any sampling: not a NotADirectoryError after it
            prepare_outdir(config.outdir, create=False)
    except ValueError as exc:
        print(f"fastdiff generate: error: {exc}", file=sys.stderr)
        return 2
    try:
        info = init_distributed(config.device)
    except ValueError as exc:
        print(f"fastdiff generate: error: --device: {exc}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, device=str(info.device))
    device = config.device
    try:
        # fastdiff .safetensors, or an official EDM2 .pkl / torch.save file read safely (no code from it runs)
        from fastdiff.io import load_any_network as load_network

        graphed = config.cuda_graphs
        if graphed and torch.device(device).type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, got --device {device}")

        loaded = []

        def load(path):
            m = load_network(path, device=device)
            if isinstance(m, torch.nn.Module):
                m.eval().requires_grad_(False)
            loaded.append(m)
            if graphed:  # each network graphed on its own: an ensemble routes whole batches to one of them
                from fastdiff.sampling.graphs import cuda_graphed

                m = cuda_graphed(m)
            return m

        net = _with_experts(load(config.net) if config.net is not None else None, config.experts, load)
        gnet = _with_experts(load(config.gnet) if config.gnet is not None else None, config.gexperts, load)
        # Latents or pixels, from the first network loaded (--net, else the first --expert), before graphing.
        decoder, latent = make_vae_decoder(config, loaded[0], device)
        return run(config, net, gnet, decoder=decoder, latent=latent)
    except ValueError as exc:
        print(f"fastdiff generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed(info)
