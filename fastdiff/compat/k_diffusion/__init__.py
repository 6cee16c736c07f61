"""k-diffusion's public sampling API on fastdiff: ``from fastdiff.compat.k_diffusion import sampling`` where code
had ``from k_diffusion import sampling``."""

from fastdiff.compat.k_diffusion import sampling

__all__ = ["sampling"]
