"""The EDM2 network on fastdiff's fused ops: MP layers, blocks, U-Net, preconditioning and presets.

Module and parameter names match the official EDM2 release, so its state dicts load unchanged.
"""

from fastdiff.nn.layers import MPConv, MPFourier, clear_weight_caches, resample
from fastdiff.nn.precond import Precond
from fastdiff.nn.presets import PRESETS, build, get_preset, preset_names
from fastdiff.nn.unet import Block, UNet

__all__ = [
    "MPConv", "MPFourier", "Block", "UNet", "Precond", "resample", "clear_weight_caches",
    "PRESETS", "build", "get_preset", "preset_names", "count_parameters",
]


def count_parameters(module) -> int:
    """Number of learnable parameters (buffers such as the Fourier frequencies not counted)."""
    return sum(p.numel() for p in module.parameters())
