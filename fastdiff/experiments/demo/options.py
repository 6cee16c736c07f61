"""The demo's options: the default sizes (:data:`DEFAULTS`, :data:`FAST` for ``--fast``), the typed
:class:`DemoOptions`, and the parsers of their comma-separated values.
"""

from __future__ import annotations

import dataclasses

from fastdiff.training.phema import MAX_STD

__all__ = ["DEFAULTS", "FAST", "NAMES", "DemoOptions", "resolve_options", "parse_preset", "parse_weights", "parse_stds"]


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


@dataclasses.dataclass
class DemoOptions:
    """The demo's options (``fastdiff demo``'s flags): ``None`` takes the default of :data:`DEFAULTS` (of
    :data:`FAST` with ``fast``)."""

    outdir: str = "demo"
    data: str | None = None
    preset: str | None = None
    guide_preset: str | None = None
    kimg: float | None = None
    guide_kimg: float | None = None
    batch: int | None = None
    label_dropout: float = 0.1
    main_stds: str | None = None
    guide_stds: str | None = None
    select_images: int | None = None
    select_weight: float | None = None
    num_images: int | None = None
    steps: int | None = None
    weights: str | None = None
    interval: str | None = None
    classifier_epochs: int | None = None
    grid: int | None = None
    fid: str = "auto"
    seed: int = 0
    device: str = "cpu"
    fast: bool = False
    no_plot: bool = False
    no_progress: bool = False

    @classmethod
    def from_namespace(cls, args) -> "DemoOptions":
        """The options of parsed command-line arguments (attributes of the same names; others are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def resolve_options(args) -> dict:
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


def parse_weights(text: str) -> list[float]:
    try:
        ws = [float(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1.5,2,3") from None
    if not ws or any(not w > 1 for w in ws):
        raise ValueError(f"--weights {text!r}: guidance weights must be > 1 (1 is no guidance, always included)")
    return sorted(set(ws))


def parse_stds(text: str, flag: str) -> list[float]:
    try:
        stds = sorted({float(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.05,0.1") from None
    if not stds or any(not 0 < s <= MAX_STD for s in stds):
        raise ValueError(f"{flag} {text!r}: each EMA std must lie in (0, {MAX_STD:.4f}]")
    return stds
