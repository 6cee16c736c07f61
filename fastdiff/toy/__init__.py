"""The 2-D toy of the autoguidance paper: a two-class tree-shaped Gaussian mixture with an exact
denoiser, small MP-MLP denoisers built from ``fastdiff.ops``, and the ``fastdiff toy`` command that
compares no guidance, CFG and autoguidance (see :mod:`fastdiff.cli.toy`)."""

from fastdiff.toy.mixture import GaussianMixture, tree_mixture
from fastdiff.toy.model import MPLinear, ToyDenoiser, train_denoiser

__all__ = ["GaussianMixture", "tree_mixture", "MPLinear", "ToyDenoiser", "train_denoiser"]
