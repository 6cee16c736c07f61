"""Grid search over EMA length, guidance weight and guidance interval, scored by a Frechet distance.

EDM2 (Karras et al. 2024, Sec. 3) chooses the EMA length after training by post-hoc EMA; the autoguidance
paper (Sec. 5) and the guidance-interval paper (Kynkaanniemi et al. 2024, Sec. 4) choose the EMA lengths, the
weight and the interval by grid search. :func:`run_sweep` does that search: the grid (``grid``), per-row
guidance so that all settings of a network pair share one batch (``guidance``), networks through post-hoc
EMA (``networks``), the resumable, distributed run (``runner``) and its outputs (``reports``).
"""

from fastdiff.experiments.sweep.grid import AXES, Cell, IntervalSpec, SweepSpec, axis_label, refine_axes
from fastdiff.experiments.sweep.guidance import PerRowGuidance
from fastdiff.experiments.sweep.networks import Networks
from fastdiff.experiments.sweep.reports import generate_command, heatmaps, write_outputs
from fastdiff.experiments.sweep.runner import (
    NonFiniteSamples, cell_evaluations, cells_dir, load_cells, run_sweep, sample_settings,
)

__all__ = ["IntervalSpec", "Cell", "SweepSpec", "PerRowGuidance", "Networks", "run_sweep", "sample_settings",
           "load_cells", "cells_dir", "cell_evaluations", "heatmaps", "refine_axes", "generate_command",
           "write_outputs", "axis_label", "AXES", "NonFiniteSamples"]
