"""A 2-D Gaussian mixture with an exact denoiser, and the tree-shaped two-class toy distribution.

:class:`GaussianMixture` holds anisotropic Gaussian components with classes and weights; diffusing it keeps it
a mixture, so its density and its denoiser (the posterior mean) are exact at every noise level, computed in
float64 without inverting a matrix (the formulas are at the class). :func:`tree_mixture` builds the toy of the
autoguidance paper. ``labels`` are one-hot rows; a row of zeros, or ``labels=None``, means unconditional.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["GaussianMixture", "tree_mixture"]

_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class GaussianMixture:
    """``K`` anisotropic 2-D Gaussians (all tensors float64 on the CPU).

    Every component ``k`` is an anisotropic Gaussian with mean ``mu_k``, a unit axis ``u_k`` (the
    orthogonal axis is ``v_k = (-u_k[1], u_k[0])``), standard deviations ``a_k`` along ``u_k`` and ``b_k``
    along ``v_k`` (so ``Sigma_k = a_k^2 u u^T + b_k^2 v v^T``), a class ``c_k`` and a weight ``pi_k``
    (normalised to sum to 1 within each class); the classes have prior masses ``class_weights`` (default:
    equally likely).

    Diffusing the data with noise of std ``sigma`` keeps it a mixture: ``p(x; sigma) = sum_k pi_k
    N(x; mu_k, Sigma_k + sigma^2 I)``, and in the component's own frame the covariance stays diagonal,
    ``diag(a^2 + sigma^2, b^2 + sigma^2)``. The exact denoiser (the posterior mean, Tweedie) is

        D(x; sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k))

    with responsibilities ``r_k = softmax_k(log pi_k + log N(x; mu_k, Sigma_k + sigma^2 I))``, computed
    with logsumexp in float64, so it is stable from ``sigma = 0`` to ``sigma = 80``. No matrix is ever
    inverted: ``Sigma (Sigma + sigma^2 I)^-1`` is ``diag(a^2/(a^2+sigma^2), b^2/(b^2+sigma^2))`` in the
    component frame.
    """

    mean: torch.Tensor  # [K, 2]
    axis: torch.Tensor  # [K, 2], unit vectors u_k
    std_along: torch.Tensor  # [K]  a_k
    std_across: torch.Tensor  # [K]  b_k
    weight: torch.Tensor  # [K]  pi_k, summing to 1 within each class
    cls: torch.Tensor  # [K]  int64 class of each component
    num_classes: int = 2
    class_weights: torch.Tensor | None = None  # [num_classes] prior masses (None: uniform)

    def __post_init__(self):
        f = dict(dtype=torch.float64)
        self.mean = torch.as_tensor(self.mean, **f).reshape(-1, 2)
        k = self.mean.shape[0]
        axis = torch.as_tensor(self.axis, **f).reshape(k, 2)
        self.axis = axis / axis.norm(dim=1, keepdim=True)
        self.std_along = torch.as_tensor(self.std_along, **f).reshape(k)
        self.std_across = torch.as_tensor(self.std_across, **f).reshape(k)
        self.cls = torch.as_tensor(self.cls, dtype=torch.int64).reshape(k)
        weight = torch.as_tensor(self.weight, **f).reshape(k)
        if bool((weight < 0).any()) or bool((self.std_along <= 0).any()) or bool((self.std_across <= 0).any()):
            raise ValueError("GaussianMixture: weights must be >= 0 and standard deviations > 0")
        totals = torch.zeros(self.num_classes, **f).index_add_(0, self.cls, weight)
        if bool((totals <= 0).any()):
            raise ValueError("GaussianMixture: every class needs at least one component of positive weight")
        self.weight = weight / totals[self.cls]
        if self.class_weights is None:
            self.class_weights = torch.full((self.num_classes,), 1.0 / self.num_classes, **f)
        cw = torch.as_tensor(self.class_weights, **f).reshape(-1)
        if cw.shape != (self.num_classes,) or bool((cw <= 0).any()) or not bool(torch.isfinite(cw).all()):
            raise ValueError(f"GaussianMixture: class_weights must be {self.num_classes} positive numbers")
        self.class_weights = cw / cw.sum()

    # --- basic facts ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def ortho(self) -> torch.Tensor:
        return torch.stack([-self.axis[:, 1], self.axis[:, 0]], dim=1)

    def covariances(self) -> torch.Tensor:
        """``Sigma_k`` as ``[K, 2, 2]``."""
        u, v = self.axis, self.ortho
        return (self.std_along**2)[:, None, None] * u[:, :, None] * u[:, None, :] + (
            self.std_across**2
        )[:, None, None] * v[:, :, None] * v[:, None, :]

    def class_prior(self) -> torch.Tensor:
        return self.class_weights.clone()

    def moments(self, cls: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean ``[2]`` and covariance ``[2, 2]`` of the data (one class, or all)."""
        pi = self.weight * self.class_prior()[self.cls]
        if cls is not None:
            pi = torch.where(self.cls == cls, self.weight, torch.zeros_like(self.weight))
        pi = pi / pi.sum()
        mu = (pi[:, None] * self.mean).sum(0)
        d = self.mean - mu
        cov = (pi[:, None, None] * (self.covariances() + d[:, :, None] * d[:, None, :])).sum(0)
        return mu, cov

    def blurred(self, blur: float) -> "GaussianMixture":
        """The same mixture with every component convolved with ``N(0, blur^2 I)`` -- equivalently
        the data at noise level ``blur``: a smooth, 'bad' version of the distribution."""
        return dataclasses.replace(
            self,
            std_along=(self.std_along**2 + blur**2).sqrt(),
            std_across=(self.std_across**2 + blur**2).sqrt(),
        )

    def transformed(self, scale: float, shift) -> "GaussianMixture":
        """``x -> scale * x + shift`` applied to the distribution."""
        shift = torch.as_tensor(shift, dtype=torch.float64)
        return dataclasses.replace(
            self, mean=self.mean * scale + shift, std_along=self.std_along * scale, std_across=self.std_across * scale
        )

    # --- conditioning ----------------------------------------------------------------------------------

    def _log_prior(self, labels, n: int) -> torch.Tensor:
        """``log(P(class c_k | labels) pi_k)`` per sample and component, ``[N, K]``."""
        prior = self.class_prior()
        if labels is None:
            cw = prior.expand(n, -1)
        else:
            labels = torch.as_tensor(labels).to(dtype=torch.float64, device="cpu").reshape(n, -1)
            if labels.shape[1] != self.num_classes:
                raise ValueError(f"labels must have shape [N, {self.num_classes}], got {tuple(labels.shape)}")
            total = labels.sum(1, keepdim=True)
            cw = torch.where(total > 0, labels / total.clamp_min(1e-300), prior)  # zero row: unconditional
        return torch.log(cw)[:, self.cls] + torch.log(self.weight)[None, :]

    # --- the exact quantities ---------------------------------------------------------------------------

    def _terms(self, x: torch.Tensor, sigma, labels):
        x64 = x.detach().to("cpu", torch.float64).reshape(-1, 2)
        n = x64.shape[0]
        s2 = torch.as_tensor(sigma, dtype=torch.float64).to("cpu").reshape(-1, 1) ** 2  # [N or 1, 1]
        if s2.shape[0] > 1 and bool((s2 == s2[0]).all()):
            s2 = s2[:1]  # one noise level for the whole batch (as in the samplers): [1, K] variances
        if s2.shape[0] not in (1, n):
            raise ValueError(f"sigma must be a number or a tensor of shape [N] = [{n}], got {tuple(s2.shape)}")
        va = self.std_along**2 + s2  # [N or 1, K]
        vb = self.std_across**2 + s2
        # Offsets from each mean in the component frame, as matmuls: pa = (x - mu_k) . u_k, pb = (x - mu_k) . v_k
        ortho = self.ortho
        pa = x64 @ self.axis.T - (self.mean * self.axis).sum(1)
        pb = x64 @ ortho.T - (self.mean * ortho).sum(1)
        log_n = -0.5 * (pa.square() / va + pb.square() / vb) - 0.5 * torch.log(va * vb) - _LOG_2PI
        return x64, s2, va, vb, pa, pb, log_n + self._log_prior(labels, n)

    def log_prob(self, x: torch.Tensor, sigma=0.0, labels=None, chunk: int = 8192) -> torch.Tensor:
        """``log p(x; sigma | labels)`` per sample, float64 ``[N]`` (in chunks of ``chunk`` rows)."""
        x = x.reshape(-1, 2)
        n = x.shape[0]
        if n > chunk:
            sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            lab = None if labels is None else torch.as_tensor(labels).reshape(n, -1)
            parts = []
            for i in range(0, n, chunk):
                s = sig if sig.numel() == 1 else sig[i:i + chunk]
                parts.append(self.log_prob(x[i:i + chunk], s, None if lab is None else lab[i:i + chunk], chunk))
            return torch.cat(parts)
        *_, logits = self._terms(x, sigma, labels)
        return torch.logsumexp(logits, dim=1)

    def denoise(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """The exact denoiser ``D(x; sigma) = E[x0 | x]``, in ``x``'s dtype and device."""
        x64, s2, va, vb, pa, pb, logits = self._terms(x, sigma, labels)
        r = torch.softmax(logits, dim=1)  # [N, K]
        ka = r * (self.std_along**2 / va) * pa  # [N, K]: responsibility times the shrunk offset along u_k
        kb = r * (self.std_across**2 / vb) * pb
        out = r @ self.mean + ka @ self.axis + kb @ self.ortho
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    __call__ = denoise  # fastdiff's denoiser convention: D = mixture(x, sigma, labels)

    def score(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """``grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2`` (sigma > 0)."""
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return ((self.denoise(x, sigma, labels).double() - x.double()) / s2).to(x.dtype)

    def sample(self, n: int, labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples ``[n, 2]`` (float64) from ``p(x | labels)``: a class per sample (from
        ``labels``, or the prior), then a component by inverse CDF within the class, then the Gaussian."""
        prior = self.class_prior()
        if labels is None:
            cw = prior.expand(n, -1)
        else:
            cw = torch.as_tensor(labels).to(dtype=torch.float64, device="cpu").reshape(n, -1)
            total = cw.sum(1, keepdim=True)
            cw = torch.where(total > 0, cw / total.clamp_min(1e-300), prior)
        onehot = bool(((cw == 0) | (cw == 1)).all())
        c = cw.argmax(1) if onehot else torch.multinomial(cw, 1, generator=generator).squeeze(1)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        k = torch.empty(n, dtype=torch.int64)
        for cls in range(self.num_classes):
            rows = (c == cls).nonzero().squeeze(1)
            members = (self.cls == cls).nonzero().squeeze(1)
            cdf = self.weight[members].cumsum(0)
            pick = torch.searchsorted(cdf, u[rows] * cdf[-1], right=True).clamp_max(len(members) - 1)
            k[rows] = members[pick]
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.mean[k] + (z[:, :1] * self.std_along[k, None]) * self.axis[k]
                + (z[:, 1:] * self.std_across[k, None]) * self.ortho[k])

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-hot class labels ``[n, num_classes]`` drawn from the class prior."""
        c = torch.multinomial(self.class_prior(), n, replacement=True, generator=generator)
        return torch.nn.functional.one_hot(c, self.num_classes).to(torch.float64)


def tree_mixture(depth: int = 7, per_branch: int = 8, seed: int = 2, sigma_data: float = 0.5,
                 class_masses=(0.477, 0.523), angle: float = math.pi / 4) -> GaussianMixture:
    """The two-class 'tree' distribution of the autoguidance paper's 2-D toy (Karras et al. 2024, Sec. 4
    and Fig. 1): per class a binary tree of ``depth`` levels whose every branch is ``per_branch``
    Gaussians elongated along it; the two classes grow from a common root in opposite directions
    (``angle`` and ``angle + pi``), with prior masses ``class_masses`` (0.477 / 0.523).

    The construction (written for fastdiff; deterministic for a given ``seed``): the branch of level
    ``l`` (0 = trunk) has length ``0.8^l (1 + 0.2 z)`` and half-thickness ``0.06 * 0.72^l`` (std across
    it); its components sit at ``t = (j + 1/2) / per_branch`` along it, each with std along
    ``0.7 L / per_branch`` and weight ``0.5^l`` (every level carries the same mass). At its end it splits
    into two children at ``+-0.55 * 0.85^l (1 + 0.2 z)`` radians. ``z`` are standard normal draws clipped
    to +-2. Finally every coordinate is scaled (about the root) so that the standard deviation of the
    whole distribution (RMS over the two coordinates) is ``sigma_data``.
    """
    if depth < 1 or per_branch < 1:
        raise ValueError(f"tree_mixture: depth and per_branch must be >= 1, got {depth}, {per_branch}")
    g = torch.Generator().manual_seed(int(seed))

    def jitter() -> float:
        return 1.0 + 0.2 * float(torch.randn((), generator=g, dtype=torch.float64).clamp(-2, 2))

    means, axes, along, across, weights, classes = [], [], [], [], [], []
    for c, theta0 in ((0, angle), (1, angle + math.pi)):
        stack = [((0.0, 0.0), theta0, 0)]
        while stack:
            (px, py), theta, level = stack.pop()
            length = 0.8**level * jitter()
            ux, uy = math.cos(theta), math.sin(theta)
            for j in range(per_branch):
                t = (j + 0.5) / per_branch
                means.append((px + t * length * ux, py + t * length * uy))
                axes.append((ux, uy))
                along.append(0.7 * length / per_branch)
                across.append(0.06 * 0.72**level)
                weights.append(0.5**level)
                classes.append(c)
            if level + 1 < depth:
                end = (px + length * ux, py + length * uy)
                for sign in (+1, -1):
                    stack.append((end, theta + sign * 0.55 * 0.85**level * jitter(), level + 1))
    mix = GaussianMixture(torch.tensor(means), torch.tensor(axes), torch.tensor(along), torch.tensor(across),
                          torch.tensor(weights), torch.tensor(classes), num_classes=2,
                          class_weights=torch.tensor(class_masses, dtype=torch.float64))
    _, cov = mix.moments()
    std = math.sqrt(float(torch.trace(cov)) / 2)
    return mix.transformed(sigma_data / std, torch.zeros(2, dtype=torch.float64))
