"""The ``fastdiff`` command line.

Each subcommand is a module of this package that defines ``add_arguments(parser)`` and
``main(args) -> int``; this file only routes to them, importing a subcommand's module when it is used so
that ``fastdiff --help`` stays fast. What several commands need lives in ``fastdiff.cli.common``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A module listed here must exist.
SUBCOMMANDS = {
    "info": ("fastdiff.cli.info", "show the compiled kernels and a quick self-check"),
    "train": ("fastdiff.cli.train", "train an EDM2 network (one process, or many under torchrun)"),
    "phema": ("fastdiff.cli.phema", "post-hoc EMA: reconstruct EMA weights from training snapshots"),
    "dataset": ("fastdiff.cli.dataset", "prepare training data (convert an image folder, encode it to VAE latents, inspect a dataset)"),
    "generate": ("fastdiff.cli.generate", "generate images from a trained network (EDM2 samplers and guidance)"),
    "convert": ("fastdiff.cli.convert", "convert an official EDM2 .pkl (read safely, no code run) or a torch.save state dict to a fastdiff network file"),
    "toy": ("fastdiff.cli.toy", "the 2-D toy of the autoguidance paper: CFG vs autoguidance, exact scores"),
    "metrics": ("fastdiff.cli.metrics", "FID / FD_DINOv2 / precision-recall / KID"),
    "demo": ("fastdiff.cli.demo", "train a small EDM2 model on offline digits; compare CFG and autoguidance"),
    "sweep": ("fastdiff.cli.sweep", "grid search of EMA length, guidance weight and interval by FD (post-hoc EMA)"),
    "bench": ("fastdiff.cli.bench", "benchmark fastdiff against plain PyTorch on this machine (ops, attention, network, sampling, training)"),
}


def build_parser() -> argparse.ArgumentParser:
    from fastdiff import __version__

    parser = argparse.ArgumentParser(
        prog="fastdiff", description="Train, sample, guide and evaluate EDM2-family diffusion models on fused CPU "
        "and CUDA kernels.", epilog="'fastdiff COMMAND --help' shows a command's options.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "--version":
        parser.parse_args(argv[:1])  # prints the version and exits
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; expected one of: {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"fastdiff {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    from fastdiff.cli.common import check_device

    problem = check_device(getattr(args, "device", None))  # one device check for every command
    if problem:
        print(f"fastdiff {name}: error: {problem}", file=sys.stderr)
        return 2
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
