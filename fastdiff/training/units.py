"""Training durations and intervals in images, written like the official tool: ``8Mi``, ``64Ki``, ``2Gi``."""

from __future__ import annotations

import re

__all__ = ["parse_nimg", "format_nimg"]

_SUFFIX = {
    "": 1, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]i?)?\s*$")


def parse_nimg(value) -> int:
    """A number of images: an int, or a string with an optional binary (``Ki``, ``Mi``, ``Gi``, ``Ti``) or
    decimal (``K``, ``M``, ``G``, ``T``) suffix, e.g. ``'8Mi'`` = 8 * 2**20, ``'1.5K'`` = 1500."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of images, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative number of images, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError(f"expected a non-negative number of images, got {value}")
        return int(round(value))
    m = _PATTERN.match(str(value))
    if not m:
        raise ValueError(f"expected a number of images like 1000, 64Ki, 8Mi or 2Gi, got {value!r}")
    number, suffix = m.group(1), (m.group(2) or "").lower()
    return int(round(float(number) * _SUFFIX[suffix]))


def format_nimg(n: int) -> str:
    """The shortest exact binary-suffixed spelling of ``n`` (``8388608`` -> ``'8Mi'``), else the plain number."""
    n = int(n)
    for suffix, mult in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)
