"""fastdiff: fused kernels and a complete workflow for EDM2-family diffusion models."""

__version__ = "0.1.0"

from fastdiff import ops  # noqa: F401  (loads the compiled extension, or warns once)

__all__ = ["ops", "__version__"]
