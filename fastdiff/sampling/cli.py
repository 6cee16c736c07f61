"""``fastdiff generate``: images from a trained network, like the official EDM2 generate_images tool.

    fastdiff generate --net=net.safetensors --outdir=out --seeds=0-63 --batch=32
    fastdiff generate --net=big.safetensors --gnet=small.safetensors --guidance=2.0 --grid=grid.png
    torchrun --nproc-per-node=4 -m fastdiff generate --net=... --seeds=0-49999 --subdirs --outdir=out

Under torchrun the seeds are split across the ranks (torch.distributed: NCCL on GPUs, gloo on CPU).
PNGs are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch

from fastdiff.sampling.generate import MAX_SEED, generate_images
from fastdiff.sampling.samplers import SAMPLERS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_seeds(text: str) -> list[int]:
    """'0-63', '1,5,9', '0-3,10-12' -> list of ints (ranges inclusive)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"bad seed range {part!r}: end before start")
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ValueError(f"malformed seeds {text!r}: expected integers and ranges like '0-63' or '1,5,10-12'")
    for s in seeds:
        if s > MAX_SEED:
            raise ValueError(f"seed {s} out of range: seeds must lie in [0, {MAX_SEED}]")
    return seeds


def parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed interval {text!r}: expected 'lo,hi', e.g. 0.28,2.9") from None
    if not 0 <= lo < hi:
        raise ValueError(f"bad interval {text!r}: expected 0 <= lo < hi")
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", required=True, help="main network: fastdiff .safetensors or official EDM2 .pkl")
    parser.add_argument("--gnet", default=None, help="guiding network: autoguidance, or CFG with an unconditional net")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance weight (1 = none) [default: 1]")
    parser.add_argument("--interval", default=None, metavar="LO,HI", help="apply guidance only for sigma in (LO, HI]")
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
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _validate(args) -> None:
    if args.outdir is None and args.grid is None:
        raise ValueError("nothing to write: give --outdir and/or --grid")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.guidance != 1 and args.gnet is None:
        raise ValueError(f"--guidance={args.guidance} needs a guiding network (--gnet); --guidance=1 means no guidance")


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def save_png(image: torch.Tensor, path: str) -> None:
    """uint8 [C, H, W] -> PNG, written to a temporary file and renamed."""
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        pil.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_grid(images: list[torch.Tensor]) -> torch.Tensor:
    """A near-square grid [C, rows*H, cols*W] of uint8 [C, H, W] images (row-major, zero padding)."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = images[0].shape
    grid = torch.zeros((c, rows * h, cols * w), dtype=torch.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def run(args, net, gnet=None) -> int:
    """Generates and writes the images with already loaded networks (this rank's share under
    torch.distributed); rank 0 writes the grid."""
    _validate(args)
    seeds = parse_seeds(args.seeds)
    interval = parse_interval(args.interval)
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = generate_images(
        net, seeds, gnet=gnet, guidance=args.guidance, interval=interval, sampler=args.sampler, steps=args.steps,
        class_idx=args.class_idx, batch=args.batch, device=device, dtype=DTYPES[args.dtype], rank=rank,
        world_size=world,
        S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise,
    )
    progress = None
    if rank == 0 and getattr(args, "progress", True):
        from tqdm import tqdm

        progress = tqdm(total=len(seeds), unit="img", desc="generate")
    kept: list[tuple[int, torch.Tensor]] = []
    for batch_seeds, images in batches:
        if args.outdir is not None:
            for seed, img in zip(batch_seeds, images):
                save_png(img, image_path(args.outdir, seed, args.subdirs))
        if args.grid is not None:
            kept.extend(zip(batch_seeds, images))
        if progress is not None:
            progress.update(len(batch_seeds) * world)
    if progress is not None:
        progress.close()
    if args.grid is not None:
        if distributed:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, kept)
            kept = [item for part in gathered for item in part]
        if rank == 0:
            kept.sort(key=lambda item: item[0])
            save_png(make_grid([img for _, img in kept]), args.grid)
    if distributed:
        dist.barrier()
    return 0


def _init_distributed(device: str | None) -> tuple[bool, str | None]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False, device
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True, device


def main(args) -> int:
    try:
        _validate(args)
        parse_seeds(args.seeds)
        parse_interval(args.interval)
    except ValueError as exc:
        print(f"fastdiff generate: error: {exc}", file=sys.stderr)
        return 2
    started, args.device = _init_distributed(args.device)
    try:
        # fastdiff .safetensors, or an official EDM2 .pkl / torch.save file read safely (no code from it runs)
        from fastdiff.io import load_any_network as load_network

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = load_network(args.net, device=device)
        gnet = load_network(args.gnet, device=device) if args.gnet is not None else None
        for m in (net, gnet):
            if isinstance(m, torch.nn.Module):
                m.eval().requires_grad_(False)
        return run(args, net, gnet)
    except ValueError as exc:
        print(f"fastdiff generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            torch.distributed.destroy_process_group()
