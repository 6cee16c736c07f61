"""k-diffusion interop, both directions.

:class:`KDiffusionDenoiser` turns a k-diffusion model (``model(x, sigma, **extra_args)``) into a fastdiff
denoiser (``denoiser(x, sigma, labels)``, one-hot labels), so fastdiff's samplers and guidance drive it;
:func:`as_kdiffusion` turns a fastdiff network into a k-diffusion model. Both add no arithmetic: a round trip
gives bit-identical outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from fastdiff.diffusion import edm_sigma_steps, sigma_per_sample

__all__ = ["KDiffusionDenoiser", "KDiffusionModel", "as_kdiffusion", "LABEL_NAMES"]

# Keyword names under which k-diffusion-style callers pass the class condition.
LABEL_NAMES = ("class_labels", "cond", "labels", "class_cond", "y")


def _sigma_vector(sigma, x: torch.Tensor) -> torch.Tensor:
    """A number, 0-d, [1] or [N] tensor -> a per-sample [N] tensor on x's device (a number in x's dtype)."""
    dtype = None if isinstance(sigma, torch.Tensor) or not x.is_floating_point() else x.dtype
    return sigma_per_sample(sigma, x.shape[0], device=x.device, dtype=dtype, who="k-diffusion model")


class KDiffusionDenoiser(torch.nn.Module):
    """A k-diffusion model ``model(x, sigma, **extra_args) -> denoised`` as a fastdiff denoiser
    ``(x, sigma, labels) -> D``.

    ``label_arg``: the keyword under which the model takes its condition (None: the model is
    unconditional and labels are ignored). ``label_format``: ``'onehot'`` passes fastdiff's one-hot
    rows unchanged; ``'index'`` passes class indices ``[N]`` (argmax of each row), with all-zero rows
    (fastdiff's null label, used by CFG) mapped to ``null_class`` (e.g. ``num_classes`` for models
    trained with an extra 'unconditional' class; an error if None). ``extra_args``: further keyword
    arguments for every call. ``pass_none``: pass ``label_arg=None`` when labels are None (else the
    keyword is left out).

    k-diffusion's convention for a denoiser is ``model(x, sigma, **extra_args) -> denoised`` with ``sigma``
    a per-sample ``[N]`` tensor and the condition passed as a keyword argument (``cond=``,
    ``class_labels=``, ``class_cond=``, ...); its samplers are called as
    ``sample_heun(model, x, sigmas, extra_args={...})``. fastdiff's convention is a callable
    ``denoiser(x, sigma, labels) -> D`` with ``sigma`` ``[N]`` and ``labels`` one-hot ``[N, label_dim]``
    (or None; an all-zero row means "no class", the null label of CFG).

    Both are ``torch.nn.Module`` s when they wrap one (``.to()``, ``.eval()``, ``.parameters()`` reach the
    wrapped network) and add no arithmetic: a round trip gives bit-identical outputs.
    """

    def __init__(self, model: Callable, label_arg: str | None = "cond", label_format: str = "onehot",
                 null_class: int | None = None, extra_args: Mapping[str, Any] | None = None,
                 pass_none: bool = False):
        super().__init__()
        if label_format not in ("onehot", "index"):
            raise ValueError(f"label_format must be 'onehot' or 'index', got {label_format!r}")
        self.model = model
        self.label_arg, self.label_format, self.null_class = label_arg, label_format, null_class
        self.extra_args = dict(extra_args or {})
        self.pass_none = pass_none

    def convert_labels(self, labels):
        if labels is None or self.label_format == "onehot":
            return labels
        if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
            raise ValueError(f"expected one-hot labels [N, label_dim], got {getattr(labels, 'shape', labels)}")
        index = labels.argmax(dim=1)
        null = labels.abs().sum(dim=1) == 0
        if bool(null.any()):
            if self.null_class is None:
                raise ValueError("an all-zero (null) label needs null_class= for label_format='index'")
            index = torch.where(null, torch.full_like(index, self.null_class), index)
        return index

    def forward(self, x: torch.Tensor, sigma, labels=None, **kwargs) -> torch.Tensor:
        extra = dict(self.extra_args)
        extra.update(kwargs)
        if self.label_arg is not None and (labels is not None or self.pass_none):
            extra[self.label_arg] = self.convert_labels(labels)
        return self.model(x, _sigma_vector(sigma, x), **extra)


class KDiffusionModel(torch.nn.Module):
    """A fastdiff network ``net(x, sigma, class_labels, **kwargs)`` as a k-diffusion model
    ``model(x, sigma, **extra_args) -> denoised`` (see :func:`as_kdiffusion`)."""

    def __init__(self, net: Callable, label_names: Sequence[str] = LABEL_NAMES, label_dim: int | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.label_names = tuple(label_names)
        self.label_dim = label_dim if label_dim is not None else getattr(net, "label_dim", None)
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def get_sigmas(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """The EDM schedule of ``n`` steps plus the final 0 (k-diffusion's ``get_sigmas_karras``)."""
        return edm_sigma_steps(n, self.sigma_min, self.sigma_max, rho, dtype=torch.float32)

    def convert_labels(self, labels, x: torch.Tensor):
        if labels is None or not isinstance(labels, torch.Tensor):
            return labels
        if labels.ndim == 1 and not labels.is_floating_point():  # class indices -> one-hot
            if not self.label_dim:
                raise ValueError("integer class labels need label_dim= (or a network with a label_dim attribute)")
            return torch.nn.functional.one_hot(labels.long(), self.label_dim).to(
                x.dtype if x.is_floating_point() else torch.float32)
        return labels

    def forward(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        given = [k for k in self.label_names if k in extra]
        if len(given) > 1:
            raise ValueError(f"the class condition was given twice ({', '.join(given)}); pass one of them")
        labels = self.convert_labels(extra.pop(given[0]), x) if given else None
        return self.net(x, _sigma_vector(sigma, x), labels, **extra)


def as_kdiffusion(net: Callable, label_names: Sequence[str] = LABEL_NAMES, label_dim: int | None = None,
                  sigma_min: float = 0.002, sigma_max: float = 80.0) -> KDiffusionModel:
    """Wraps a fastdiff network for k-diffusion-style samplers: ``model(x, sigma, **extra)`` with
    ``sigma`` a number or ``[N]`` tensor and the class condition under any of ``label_names``
    (``class_labels=``, ``cond=``, ...) as one-hot rows or integer class indices (converted to one-hot
    with ``label_dim``, default ``net.label_dim``); other keyword arguments go to ``net`` unchanged.
    Use as ``sample_heun(as_kdiffusion(net), x, sigmas, extra_args={'class_labels': labels})``."""
    return KDiffusionModel(net, label_names, label_dim, sigma_min, sigma_max)
