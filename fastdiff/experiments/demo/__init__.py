"""The guidance demo: train a small class-conditional EDM2 model and a smaller, shorter-trained guide on
offline digits, choose both EMA lengths by post-hoc EMA, and compare no guidance, classifier-free guidance,
autoguidance and autoguidance with a guidance interval on the same seeds, on a CPU (no GPU, no internet).

:func:`run_demo` runs it (its docstring lists the steps) from :class:`DemoOptions`: options and their
parsers (``options``), the networks (``training``), the measurements (``scoring``), the verdicts and the
written report (``report``).
"""

from fastdiff.experiments.demo.options import DEFAULTS, FAST, NAMES, DemoOptions, parse_preset, resolve_options
from fastdiff.experiments.demo.report import comparisons, report, table, verdict
from fastdiff.experiments.demo.run import run_demo
from fastdiff.experiments.demo.scoring import labels_for_seeds

__all__ = ["run_demo", "DemoOptions", "DEFAULTS", "FAST", "NAMES", "parse_preset", "resolve_options",
           "labels_for_seeds", "comparisons", "verdict", "table", "report"]
