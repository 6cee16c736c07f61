"""``fastdiff sweep``: grid search over main / guide EMA length (post-hoc EMA), guidance weight and
guidance interval, scored by a Frechet distance streamed from the sampler (no images written).

Every cell uses the same seeds; each finished cell is saved at once (OUTDIR/cells/), so a rerun of the
same command resumes; under torchrun the cells are split across the processes. Writes OUTDIR/sweep.csv,
sweep.json, heatmap-<axis>-<axis>.png (best cell boxed) and prints the ``fastdiff generate`` command
of the best cell. ``--refine N`` adds N coarse-to-fine rounds around the best cell.
"""

from __future__ import annotations

import argparse
import sys

from fastdiff._dist import init_distributed, rank_and_world, shutdown_distributed
from fastdiff.cli.common import check_device, parse_seeds, parse_stds, prepare_outdir


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise ValueError(f"{what}: expected at least one value")
    return vals


def parse_intervals(sigma_text: str | None, steps_text: str | None):
    """``--intervals "none;0.28,5.42"`` and ``--interval-steps "4,8;5,9"`` -> the interval axis."""
    from fastdiff.experiments.sweep import IntervalSpec

    out: list = []
    for text, kind in ((sigma_text, "sigma"), (steps_text, "steps")):
        if text is None:
            continue
        for item in str(text).split(";"):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "none":
                out.append(None)
                continue
            vals = _floats(item, "--interval-steps" if kind == "steps" else "--intervals")
            if len(vals) != 2:
                raise ValueError(f"interval {item!r}: expected LO,HI")
            out.append(IntervalSpec(kind, vals[0], vals[1]))
    return out or [None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    g = parser.add_argument_group("networks")
    g.add_argument("--main-snapshots", metavar="DIR", help="training run folder with EMA snapshots (post-hoc EMA)")
    g.add_argument("--net", help="a fixed main network file instead of --main-snapshots")
    g.add_argument("--guide-snapshots", metavar="DIR", help="the guide's training run folder (autoguidance)")
    g.add_argument("--gnet", help="a fixed guide network file (autoguidance); without a guide: CFG, null label")
    g = parser.add_argument_group("axes")
    g.add_argument("--main-stds", default=None, help="main EMA stds, e.g. 0.05,0.1,0.15 (needs --main-snapshots)")
    g.add_argument("--guide-stds", default=None, help="guide EMA stds (needs --guide-snapshots)")
    g.add_argument("--weights", default="1,1.5,2", help="guidance weights, 1 = none [default: 1,1.5,2]")
    g.add_argument("--intervals", default=None, metavar="LIST",
                   help="sigma intervals separated by ';', each LO,HI or none, e.g. 'none;0.28,5.42'")
    g.add_argument("--interval-steps", default=None, metavar="LIST",
                   help="step-index intervals (inclusive, Heun corrections count as their step), e.g. '17,22;13,19'")
    g.add_argument("--refine", type=int, default=0, help="coarse-to-fine rounds around the best cell [default: 0]")
    g = parser.add_argument_group("metric and sampling")
    g.add_argument("--ref", required=True, help="reference statistics .npz (fastdiff metrics ref)")
    g.add_argument("--metric", default="fd", help="fd (with --detector), fid or fd_dinov2 [default: fd]")
    g.add_argument("--detector", default=None, help="registered detector, e.g. classifier [default: the ref's]")
    g.add_argument("--detector-weights", default=None, help="local weights file of the detector")
    g.add_argument("--seeds", default="0-255", help="seeds of every cell [default: 0-255]")
    g.add_argument("--steps", type=int, default=32, help="Heun steps [default: 32]")
    g.add_argument("--batch", type=int, default=256, help="rows per network call, all settings together [default: 256]")
    g.add_argument("--outdir", default="sweep", help="output folder [default: sweep]")
    g.add_argument("--device", default=None, help="[default: cuda if available, else cpu]")
    g.add_argument("--no-plot", action="store_true", help="no heatmaps")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def main(args) -> int:
    from fastdiff.metrics import fd_metric_name, get_detector, load_reference
    from fastdiff.metrics.evaluate import resolve_metrics
    from fastdiff.experiments.sweep import NonFiniteSamples, SweepSpec, generate_command, run_sweep, write_outputs

    try:
        seeds = parse_seeds(args.seeds)
        main_stds = parse_stds(args.main_stds) if args.main_stds else [None]
        guide_stds = parse_stds(args.guide_stds) if args.guide_stds else [None]
        spec = SweepSpec(main_stds, guide_stds, _floats(args.weights, "--weights"),
                         parse_intervals(args.intervals, args.interval_steps))
        if (args.net is None) == (args.main_snapshots is None):
            raise ValueError("give exactly one of --main-snapshots DIR and --net FILE")
        if args.gnet is not None and args.guide_snapshots is not None:
            raise ValueError("give at most one of --guide-snapshots DIR and --gnet FILE")
        if args.main_snapshots and main_stds == [None]:
            raise ValueError("--main-snapshots needs --main-stds (the EMA lengths to reconstruct)")
        if args.guide_snapshots and guide_stds == [None]:
            raise ValueError("--guide-snapshots needs --guide-stds")
        if args.steps < 1 or args.batch < 1 or args.refine < 0:
            raise ValueError("--steps and --batch must be >= 1, --refine >= 0")
        bad_device = check_device(args.device)
        if bad_device:
            raise ValueError(bad_device)
        ref = load_reference(args.ref)
        canonical, det_name = resolve_metrics(args.metric, args.detector, ref.detector)
        if canonical != ["fd"]:
            raise ValueError(f"--metric {args.metric}: the sweep scores Frechet distances only (fd, fid, fd_dinov2)")
        prepare_outdir(args.outdir)  # last: nothing is created for a command refused above
    except (ValueError, argparse.ArgumentTypeError, FileNotFoundError) as exc:
        print(f"fastdiff sweep: error: {exc}", file=sys.stderr)
        return 2
    info = init_distributed(args.device)
    device = str(info.device)
    try:
        detector = get_detector(det_name, weights=args.detector_weights, device=device)
        summary = run_sweep(spec, args.outdir, detector=detector, ref=ref, seeds=seeds, steps=args.steps,
                            main_net=args.net, main_snapshots=args.main_snapshots, guide_net=args.gnet,
                            guide_snapshots=args.guide_snapshots, batch=args.batch, device=device,
                            refine=args.refine, metric_name=fd_metric_name(det_name), progress=args.progress)
        if rank_and_world()[0] == 0:
            paths = write_outputs(summary, args.outdir, plots=not args.no_plot)
            best = summary["best"]
            print(f"{len(summary['rows'])} cells; best {summary['metric']} {best['value']:.4g}: main std "
                  f"{best['main_std']}, guide std {best['guide_std']}, w {best['weight']:g}, interval "
                  f"{best['interval']}")
            print("reproduce: " + generate_command(summary, guide_given=args.gnet is not None or
                                                   args.guide_snapshots is not None))
            print(f"wrote {', '.join(paths)}")
        return 0
    except NonFiniteSamples as exc:  # as fastdiff generate: a diverged network fails the run
        print(f"fastdiff sweep: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdiff sweep: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed(info)
