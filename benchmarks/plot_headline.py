"""Draws BENCHMARKS.md's headline plot (``benchmarks/speedup.png``) from BENCHMARKS.md's headline table.

The table is the source: each row names a host, a case (``preset, batch B``), a thread count and fastdiff's
speed-up against the plain EDM2 network, ONNX Runtime and OpenVINO (``-`` where not measured). One panel per
baseline, one bar group per case, one bar per host and thread count.

    python benchmarks/plot_headline.py [BENCHMARKS.md] [--out benchmarks/speedup.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HEADER = "| host | case | threads | vs plain EDM2 | vs ONNX Runtime | vs OpenVINO |"


def headline_rows(text: str) -> list[dict]:
    """The rows of the headline table (the one whose header is ``HEADER``)."""
    lines = text.splitlines()
    try:
        start = lines.index(HEADER)
    except ValueError:
        raise SystemExit(f"BENCHMARKS.md has no headline table (header {HEADER!r})") from None
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        host, case, threads, *ratios = cells

        def num(c):
            m = re.match(r"([0-9.]+)x", c)
            return float(m.group(1)) if m else None

        rows.append(dict(host=host, case=case, threads=threads, ratios=[num(c) for c in ratios]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "speedup.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headline_rows(Path(args.bench).read_text())
    cases = list(dict.fromkeys(r["case"] for r in rows))
    series = list(dict.fromkeys((r["host"], r["threads"]) for r in rows))
    titles = ["vs plain EDM2 (PyTorch eager)", "vs ONNX Runtime", "vs OpenVINO"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    width = 0.8 / max(len(series), 1)
    colors = {key: f"C{j % 10}" for j, key in enumerate(series)}  # one colour per series in every panel
    for k, (ax, title) in enumerate(zip(axes, titles)):
        for j, (host, threads) in enumerate(series):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = next((r for r in rows if r["case"] == case and (r["host"], r["threads"]) == (host, threads)), None)
                if r is not None and r["ratios"][k] is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(r["ratios"][k])
            ax.bar(xs, ys, width, color=colors[(host, threads)],
                   label=f"{host}, {threads} thread{'s' if threads != '1' else ''}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(2.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("fastdiff speed-up (x, > 1 = faster)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in series]
    axes[0].legend(handles, [f"{h}, {t} thread{'s' if t != '1' else ''}" for h, t in series], fontsize=7,
                   loc="upper left")
    fig.suptitle("fastdiff on the CPU, float32, denoiser forward (BENCHMARKS.md headline table)", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
