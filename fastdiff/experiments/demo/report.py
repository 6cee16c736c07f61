"""The demo's verdicts (a method is better only when it wins on all seeds and on each half of them), its
table, ``report.md``, ``metrics.png`` and ``overview.png``.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdiff._atomic import atomic_write_with
from fastdiff.experiments.demo.options import NAMES

__all__ = ["comparisons", "verdict", "table", "report", "plot", "save_overview", "best_setting", "results_weight"]


def best_setting(results: dict, method: str) -> dict | None:
    rows = [r for r in results["settings"] if r["method"] == method]
    return min(rows, key=lambda r: r["fd_classifier"]) if rows else None


def beats(a: dict, b: dict) -> bool:
    """``a`` lower than ``b`` on all the seeds and on each half of them."""
    return all(a[k] < b[k] for k in ("fd_classifier", "fd_half_a", "fd_half_b"))


def comparisons(results: dict) -> list[dict]:
    none = best_setting(results, "none")
    out = []
    pairs = [("CFG", "none"), ("autoguidance", "none"), ("autoguidance+interval", "none"),
             ("autoguidance", "CFG"), ("autoguidance+interval", "autoguidance")]
    for a, b in pairs:
        ra, rb = best_setting(results, a), (none if b == "none" else best_setting(results, b))
        if ra is None or rb is None:
            continue
        if beats(ra, rb):
            verdict = "better"
        elif beats(rb, ra):
            verdict = "worse"
        else:
            verdict = "within the seed-to-seed spread"
        out.append(dict(a=a, b=b, a_key=ra["key"], b_key=rb["key"], a_fd=ra["fd_classifier"], b_fd=rb["fd_classifier"],
                        a_halves=[ra["fd_half_a"], ra["fd_half_b"]], b_halves=[rb["fd_half_a"], rb["fd_half_b"]],
                        verdict=verdict))
    return out


def spread(results: dict) -> float:
    """The typical |FD(half A) - FD(half B)| over the settings (median)."""
    diffs = [abs(r["fd_half_a"] - r["fd_half_b"]) for r in results["settings"]]
    return float(np.median(diffs)) if diffs else float("nan")


def verdict(results: dict) -> str:
    lines = []
    for c in results["comparisons"]:
        a = NAMES[c["a"]] + f" (best w={results_weight(results, c['a_key']):g})"
        b = NAMES[c["b"]] + ("" if c["b"] == "none" else f" (best w={results_weight(results, c['b_key']):g})")
        lines.append(f"- {a}: FD {c['a_fd']:.3f} (halves {c['a_halves'][0]:.3f} / {c['a_halves'][1]:.3f}) vs {b}: "
                     f"{c['b_fd']:.3f} ({c['b_halves'][0]:.3f} / {c['b_halves'][1]:.3f}): **{c['verdict']}**.")
    none, real = best_setting(results, "none"), results.get("real")
    lines.append(f"- Seed-to-seed spread: the two halves of the seeds differ by {spread(results):.3f} in FD (median "
                 f"over the settings); 'better' needs a lower FD on all seeds and on each half.")
    if real and none:
        lines.append(f"- The FD of {real['num_images']} real images, {real['fd_classifier']:.3f}, is the floor for this "
                     f"number of images; without guidance the model is {none['fd_classifier'] - real['fd_classifier']:.3f} "
                     f"above it.")
    return "\n".join(lines)


def results_weight(results: dict, key: str) -> float:
    return next(r["weight"] for r in results["settings"] if r["key"] == key)


def table(results: dict) -> str:
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


def fmt_time(t: dict) -> str:
    return f"{t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU"


def report(results: dict) -> str:
    mn, gd, sm, tm, mt = results["main"], results["guide"], results["sampler"], results["timings"], results["metric"]
    sel, data, mach = results["ema_selection"], results["data"], results["machine"]
    fid_line = mt["fid"] or mt["fid_note"] or ""
    calls = "\n".join(f"  - {name}: {c['settings']} settings in one batch, {c['image_evaluations']['main']} main and "
                      f"{c['image_evaluations']['guide']} guiding image-evaluations, {fmt_time(c)} (load average "
                      f"{c['load_start']} -> {c['load_end']})" for name, c in sm["calls"].items())
    steps = "\n".join(f"  - {k}: {fmt_time(v)}" + (f" (load {v['load_start']} -> {v['load_end']})" if v.get("load_start")
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

{table(results)}

{verdict(results)}

These are the numbers as they came out of this run ({sm['num_images']} images per setting, one training seed).
Grids: `grid-<setting>.png` (the first seeds, in the same order everywhere), `overview.png` (real images of each
column's class, then one row per setting, in table order). {('Plot: `' + results['plot'] + '`.') if results['plot'] else results.get('plot_error', '')}
`classifier.safetensors` and `ref-classifier.npz` let `fastdiff sweep` score with the same detector.

Time (wall and CPU seconds; the CPU time counts all threads, the wall time depends on what else runs):
{steps}
  - sampling, per batch of settings:
{calls}
  - total: {fmt_time(tm['total'])}, on {mach['cpus']} CPU(s), {mach['torch_threads']} torch thread(s), device {mach['device']}
    (load average {tm['total']['load_start']} -> {tm['total']['load_end']}).
"""


def plot(path: str, results: dict) -> None:
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
    none = best_setting(results, "none")
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


def save_overview(grid: torch.Tensor, names: list[str], classes: list[int], cell: int, path: str) -> None:
    """The overview grid (one row per setting, the first row real images) with the rows' names in a left
    margin and each column's intended class above it."""
    from PIL import Image, ImageDraw

    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB").convert("RGB")
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
