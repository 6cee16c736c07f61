"""What a sweep writes: ``sweep.csv``, ``sweep.json``, a heatmap per pair of axes, and the ``fastdiff
generate`` command of the best cell.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys

import numpy as np

from fastdiff._atomic import atomic_write_with
from fastdiff.experiments.sweep.grid import AXES, IntervalSpec, axis_label

__all__ = ["generate_command", "heatmaps", "write_outputs"]


def generate_command(summary: dict, row: dict | None = None, guide_given: bool = True) -> str:
    """The ``fastdiff generate`` command that samples the best cell (or ``row``) with the same seeds."""
    row = row or summary["best"]
    main = summary["networks"]["main"][str(row["main_std"])]
    parts = ["fastdiff generate", f"--net {main}", f"--steps {summary['steps']}",
             f"--seeds {summary['seeds'][0]}-{summary['seeds'][1]}"]
    if row["weight"] != 1:
        if guide_given and summary["networks"]["guide"]:
            parts.append(f"--gnet {summary['networks']['guide'][str(row['guide_std'])]}")
        else:
            parts.append("--guidance-method cfg")
        parts.append(f"--guidance {row['weight']:g}")
        iv = row["interval"]
        if iv is not None:
            if iv["kind"] == "sigma":
                parts.append(f"--interval {iv['lo']:g},{iv['hi']:g}")
            else:
                parts.append(f"--interval-steps {int(iv['lo'])},{int(iv['hi'])}")
    parts.append("--outdir samples")
    return " ".join(parts)


def _axis_value(row: dict, axis: str) -> str:
    v = row[axis]
    if axis == "interval":
        return axis_label(axis, None if v is None else IntervalSpec(v["kind"], v["lo"], v["hi"]))
    return axis_label(axis, v)


def heatmaps(summary: dict, outdir: str) -> list[str]:
    """A PNG per pair of axes with more than one value: the metric minimised over the other axes, the best
    cell marked. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, best = summary["rows"], summary["best"]
    axes = [a for a in AXES if len(summary["axes"][a]) > 1]
    written = []
    for a, b in itertools.combinations(axes, 2):
        ya, xb = summary["axes"][a], summary["axes"][b]
        grid = np.full((len(ya), len(xb)), np.nan)
        for r in rows:
            i, j = ya.index(_axis_value(r, a)), xb.index(_axis_value(r, b))
            grid[i, j] = r["value"] if np.isnan(grid[i, j]) else min(grid[i, j], r["value"])
        fig = Figure(figsize=(1.2 + 0.9 * len(xb), 1.2 + 0.6 * len(ya)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        fig.colorbar(im, ax=ax, label=summary["metric"] + " (lower is better)")
        for i in range(len(ya)):
            for j in range(len(xb)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white")
        bi, bj = ya.index(_axis_value(best, a)), xb.index(_axis_value(best, b))
        ax.add_patch(_rect(bj, bi))
        ax.set_xticks(range(len(xb)), xb, rotation=30, fontsize=7)
        ax.set_yticks(range(len(ya)), ya, fontsize=7)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        ax.set_title(f"{summary['metric']}, best over the other axes; red box = best cell", fontsize=8)
        path = os.path.join(outdir, f"heatmap-{a}-{b}.png")
        atomic_write_with(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=90))
        written.append(path)
    return written


def _rect(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)


def write_outputs(summary: dict, outdir: str, plots: bool = True) -> list[str]:
    """``sweep.csv``, ``sweep.json`` and (with matplotlib) the heatmaps; returns the paths written."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["main_std", "guide_std", "weight", "interval", summary["metric"], "evaluations_per_image",
                "round", "key"])
    for r in sorted(summary["rows"], key=lambda r: r["value"]):
        w.writerow([_axis_value(r, "main_std"), _axis_value(r, "guide_std"), f"{r['weight']:g}",
                    _axis_value(r, "interval"), f"{r['value']:.6g}", r["evaluations"]["per_image"], r["round"],
                    r["key"]])
    paths = [os.path.join(outdir, "sweep.csv"), os.path.join(outdir, "sweep.json")]
    atomic_write_with(paths[0], lambda f: f.write(buf.getvalue().encode()))
    atomic_write_with(paths[1], lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    if plots and summary["rows"]:
        try:
            paths += heatmaps(summary, outdir)
        except ImportError as exc:
            print(f"sweep: no heatmaps ({exc}); install matplotlib", file=sys.stderr)
    return paths
