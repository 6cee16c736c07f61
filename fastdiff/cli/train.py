"""``fastdiff train``: train an EDM2-family network (one process, or many under ``torchrun``).

    fastdiff train --preset tiny-16 --data builtin:digits --outdir runs/digits --duration 1Mi
    torchrun --standalone --nproc_per_node 8 -m fastdiff.cli.train \
        --preset edm2-img512-s --data latents.zip --outdir runs/s --batch-gpu 32

Training resumes from the newest complete checkpoint in ``--outdir`` (a run holds a lock on it); counts of
images take the suffixes Ki, Mi, Gi or K, M, G; ``--preset`` also takes ``module:function`` for a network of
your own (see ``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastdiff.cli.common import parse_stds, positive_count, prepare_outdir
from fastdiff.training.units import parse_nimg

__all__ = ["add_arguments", "main", "build_run"]


def _stds(text: str):
    return [] if str(text).strip().lower() in ("", "none") else parse_stds(text)


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--outdir", required=True, help="run folder: snapshots, checkpoints, stats.jsonl (resumed if present)")
    g.add_argument("--data", required=True, help="dataset: folder or zip (dataset.json labels), or builtin:digits, "
                   "builtin:mnist, builtin:shapes")
    g.add_argument("--preset", default="tiny-16", help="network preset (fastdiff.nn), or module:function (default tiny-16)")
    g.add_argument("--cond", dest="cond", action="store_true", default=None, help="class-conditional (default: when "
                   "the dataset has labels)")
    g.add_argument("--uncond", dest="cond", action="store_false", help="unconditional (network without labels)")
    g.add_argument("--xflip", action="store_true", help="augment with mirrored images")
    g.add_argument("--seed", type=int, default=0, help="seed for initialization, data order and noise (default 0)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    g = parser.add_argument_group("durations (images; suffixes Ki/Mi/Gi)")
    g.add_argument("--duration", type=parse_nimg, default=None, help="train this many images (default: preset)")
    g.add_argument("--batch", type=parse_nimg, default=None, help="global batch size (default: preset)")
    g.add_argument("--batch-gpu", type=parse_nimg, default=0, help="images per forward per process (gradient "
                   "accumulation when smaller than batch / processes)")
    g.add_argument("--status", type=parse_nimg, default=None, help="status line and stats record interval")
    g.add_argument("--snapshot", type=parse_nimg, default=None, help="EMA snapshot interval (0: only at the end)")
    g.add_argument("--checkpoint", type=parse_nimg, default=None, help="checkpoint interval (0: only at the end)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None, help="reference learning rate alpha_ref (default: preset)")
    g.add_argument("--decay", type=float, default=None, help="learning-rate decay time t_ref in steps (0: none)")
    g.add_argument("--rampup", type=float, default=None, help="learning-rate warm-up in Mimg (default: preset, 10 for "
                   "EDM2 presets, else a tenth of the duration)")
    g.add_argument("--init", default=None, metavar="NET", help="start from this network's weights (a .safetensors "
                   "network or snapshot of the same --preset) instead of a random initialization: fine-tuning")
    g.add_argument("--sigma-range", dest="sigma_range", default=None, metavar="LO,HI", help="train on noise levels "
                   "in (LO, HI] only (the loss's log-normal truncated to it; HI may be inf): an expert denoiser "
                   "for `fastdiff generate --expert NET:LO,HI`, usually with --init from a base network")
    g.add_argument("--P-mean", dest="P_mean", type=float, default=None, help="loss: mean of ln(sigma)")
    g.add_argument("--P-std", dest="P_std", type=float, default=None, help="loss: std of ln(sigma)")
    g.add_argument("--dropout", type=float, default=None, help="dropout probability (default: preset)")
    g.add_argument("--label-dropout", type=_probability, default=None, metavar="P", help="probability that a "
                   "training image sees the null (all-zero) label, so the network is also its own unconditional "
                   "model for classifier-free guidance (conditional runs only; default: preset, else 0)")
    g.add_argument("--ema", type=_stds, default=[0.05, 0.10], help="power-function EMA stds (default 0.05,0.10; none)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision; the weights stay float32 (default fp32)")
    g.add_argument("--loss-scaling", type=float, default=1.0, help="loss scale for fp16 (default 1)")
    g = parser.add_argument_group("housekeeping")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes (default 2)")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="keep only this many newest checkpoints (0: all)")
    g.add_argument("--restart", "--no-resume", dest="no_resume", action="store_true",
                   help="start over from 0 images even if --outdir has checkpoints (they are removed); without "
                   "it a run resumes from the newest usable checkpoint and refuses to start when none is usable")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")


def _round_to(n: int, batch: int) -> int:
    return max(batch, (int(n) // batch) * batch)


def _data_has_labels(spec: str) -> bool:
    """Whether the dataset ``spec`` has class labels (the built-in ones all do; a folder or zip when its
    ``dataset.json`` lists them), read before the network is built so that ``--cond``'s default can follow it."""
    import os

    from fastdiff.data import ImageDataset

    if str(spec).startswith("builtin:") or not os.path.exists(str(spec)):
        return True  # (a missing path is reported when the dataset is opened)
    ds = ImageDataset(str(spec))
    try:
        return ds.has_labels
    finally:
        ds.close()


def build_run(args):
    """(net, loss_fn, dataset, TrainConfig) from parsed arguments."""
    import torch

    from fastdiff.data import open_dataset
    from fastdiff.training.loop import TrainConfig

    overrides = {}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.cond is False or (args.cond is None and not _data_has_labels(args.data)):
        overrides["label_dim"] = 0  # --uncond, or the default for a dataset without labels
    torch.manual_seed(args.seed)  # the same initial weights in every process
    precision_in_net = False
    if ":" in args.preset:
        mod_name, _, fn_name = args.preset.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--preset {args.preset}: cannot import {fn_name} from {mod_name} ({exc})") from exc
        made = factory(**overrides)
        net, loss_fn, training = made["net"], made.get("loss"), dict(made.get("training") or {})
    else:
        try:
            import fastdiff.nn as fnn
        except ImportError as exc:
            raise ValueError(f"--preset {args.preset}: fastdiff.nn is not available ({exc})") from exc
        preset = fnn.get_preset(args.preset)
        training = dict(preset.get("training") or {})
        kwargs = dict(overrides, use_fp16=False)
        if args.precision != "fp32":
            # The network runs its activations in the reduced dtype itself (MP weights normalized in float32),
            # the official mixed-precision scheme; the parameters stay float32.
            kwargs["dtype"] = args.precision  # a dtype name (fastdiff._runtime.DTYPE_NAMES)
            precision_in_net = True
        net = fnn.build(args.preset, **kwargs)
        loss_fn = None
    if loss_fn is None or args.P_mean is not None or args.P_std is not None:
        from fastdiff.diffusion import EDM2Loss

        loss_fn = EDM2Loss(P_mean=args.P_mean if args.P_mean is not None else training.get("P_mean", -0.4),
                           P_std=args.P_std if args.P_std is not None else training.get("P_std", 1.0),
                           sigma_data=getattr(net, "sigma_data", 0.5))
    sigma_range = getattr(args, "sigma_range", None)
    if sigma_range is not None:
        from fastdiff.diffusion import EDM2Loss
        from fastdiff.sampling.experts import parse_sigma_range
        from fastdiff.training.experts import TruncatedEDM2Loss

        if not isinstance(loss_fn, EDM2Loss):
            raise ValueError(f"--sigma-range needs the EDM2 loss, but --preset {args.preset} brings "
                             f"{type(loss_fn).__name__}")
        sigma_range = parse_sigma_range(sigma_range, "--sigma-range")
        loss_fn = TruncatedEDM2Loss(loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data, sigma_range)
    if getattr(args, "init", None) is not None:
        from fastdiff.training.experts import load_init_weights

        load_init_weights(net, args.init)

    # Not `args.batch or default`: --batch 0 / --duration 0 are mistakes, not "the preset's".
    batch = positive_count(args.batch, "--batch") or int(training.get("batch", 2048))
    duration = positive_count(args.duration, "--duration") or int(training.get("duration", 1 << 27))
    rampup = args.rampup
    if rampup is None:
        rampup = training.get("rampup_mimg")
    if rampup is None:
        rampup = 10.0 if args.preset.startswith("edm2-") else duration / 10 / 1e6
    status = args.status if args.status is not None else _round_to(min(128 << 10, duration // 50), batch)
    snapshot = args.snapshot if args.snapshot is not None else _round_to(min(8 << 20, duration // 16), batch)
    checkpoint = args.checkpoint if args.checkpoint is not None else _round_to(min(128 << 20, duration // 4), batch)
    dataset = open_dataset(args.data, resolution=net.img_resolution, channels=net.img_channels, xflip=args.xflip,
                           use_labels=args.cond is not False)
    cond = args.cond if args.cond is not None else (dataset.has_labels and getattr(net, "label_dim", 0) > 0)
    if getattr(net, "label_dim", 0) > 0 and not cond:
        raise ValueError(f"--preset {args.preset} is class-conditional; with unlabelled data pass --uncond")
    config = TrainConfig(
        batch=batch, batch_gpu=args.batch_gpu, duration=duration, status=status, snapshot=snapshot,
        checkpoint=checkpoint,
        lr=args.lr if args.lr is not None else float(training.get("lr", 0.01)),
        lr_decay=args.decay if args.decay is not None else float(training.get("lr_decay", 70000)),
        rampup_mimg=float(rampup), ema_stds=tuple(args.ema), seed=args.seed,
        precision="fp32" if precision_in_net else args.precision, loss_scaling=args.loss_scaling, cond=bool(cond),
        label_dropout=float(args.label_dropout if args.label_dropout is not None
                            else training.get("label_dropout", 0.0)),
        workers=args.workers, keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        tensorboard=args.tensorboard, resume=not args.no_resume,
        extra=dict(preset=args.preset, data=args.data, xflip=args.xflip, network_precision=args.precision
                   if precision_in_net else None, init=getattr(args, "init", None),
                   sigma_range=getattr(args, "sigma_range", None)),
    )
    return net, loss_fn, dataset, config


def main(args) -> int:
    from fastdiff.data import DatasetError
    from fastdiff import _dist as D
    from fastdiff.training.training_state import CheckpointError
    from fastdiff.training.loop import training_loop
    from fastdiff.training.rundir import RunDirectoryBusy

    try:
        positive_count(args.batch, "--batch")
        positive_count(args.duration, "--duration")
        prepare_outdir(args.outdir, create=False)
        info = D.init_distributed(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"fastdiff train: error: {exc}", file=sys.stderr)
        return 1
    try:
        net, loss_fn, dataset, config = build_run(args)
        result = training_loop(net, loss_fn, dataset, args.outdir, config, device=info.device)
    except (ValueError, DatasetError, FileNotFoundError, ImportError, CheckpointError, RunDirectoryBusy) as exc:
        print(f"fastdiff train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        D.shutdown_distributed(info)
    if info.rank == 0:
        state = "stopped" if result["stopped"] else "done"
        print(f"fastdiff train: {state} at {result['nimg']} images, step {result['step']}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m fastdiff.cli.train ... (also what torchrun -m runs)
    _parser = argparse.ArgumentParser(prog="fastdiff train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
