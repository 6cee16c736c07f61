"""Samplers and guidance for EDM-family diffusion models.

``sample(denoiser, noise, sampler='heun', steps=32, guidance=None, labels=None, generators=None, ...)`` draws
samples with any ``denoiser(x, sigma, labels) -> D`` by any sampler of ``SAMPLERS`` (each also a public
``sample_NAME`` function in the k-diffusion manner); ``edm_sampler`` is a drop-in for the official function;
guidance objects compose with every sampler; ``generate_images`` turns seeds into uint8 images;
``cuda_graphed`` replays CUDA graphs; ``Experts`` routes each evaluation to the network for its noise level.
"""

from fastdiff.sampling import guidance, rng
from fastdiff.sampling.experts import Experts
from fastdiff.sampling.generate import generate_images, make_guidance
from fastdiff.sampling.graphs import GraphedDenoiser, cuda_graphed
from fastdiff.sampling.guidance import APG, CADS, CFG, ICG, TSG, Autoguidance, Guidance, Guided, Interval
from fastdiff.sampling.kdiffusion import KDiffusionDenoiser, as_kdiffusion
from fastdiff.diffusion import edm_sigma_steps
from fastdiff.sampling.adaptive import sample_dpm_adaptive
from fastdiff.sampling.dpm import (
    sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde,
    sample_dpmpp_sde, sample_lms,
)
from fastdiff.sampling.samplers import (
    SAMPLERS, edm_sampler, sample, sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun,
    sampler_function,
)

__all__ = [
    "sample", "edm_sampler", "edm_sigma_steps", "SAMPLERS", "generate_images", "make_guidance", "guidance", "rng",
    "Guidance", "Guided", "CFG", "Autoguidance", "Interval", "APG", "ICG", "TSG", "CADS",
    "KDiffusionDenoiser", "as_kdiffusion", "cuda_graphed", "GraphedDenoiser", "Experts", "sampler_function",
    "sample_heun", "sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
    "sample_dpm_adaptive",
]
