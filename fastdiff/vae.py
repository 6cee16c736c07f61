"""The VAE stage of EDM2's latent models: the Stable Diffusion VAE (diffusers' ``AutoencoderKL``), from local files.

EDM2's ImageNet-512 networks (Karras et al. 2024, Sec. 5) denoise 4x64x64 latents of the Stable Diffusion VAE
``sd-vae-ft-mse``. :class:`VAE` is that stage as EDM2 defines it (encode to the posterior mean and std, sample
normalized latents, decode to uint8), read by :func:`load_vae` from a diffusers folder or one ``.safetensors``
file. Nothing is ever downloaded and pickled weights are refused.

Needs ``pip install "fastdiff[latent]"`` (diffusers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch

from fastdiff.data.latent import OFFICIAL_SCALING, LatentScaling

__all__ = ["VAE", "load_vae", "fingerprint", "SD_VAE_CONFIG", "VAEError"]

# The Stable Diffusion VAE (sd-vae-ft-mse, and the original SD 1.x VAE) in diffusers' terms.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_HOW_TO_GET = ("fastdiff never downloads it: fetch the Stable Diffusion VAE by hand, e.g. the folder of "
               "stabilityai/sd-vae-ft-mse (config.json + diffusion_pytorch_model.safetensors) or the single file "
               "vae-ft-mse-840000-ema-pruned.safetensors (stabilityai/sd-vae-ft-mse-original)")


class VAEError(ValueError):
    """A VAE that cannot be loaded or used: the message says what was expected."""


def _diffusers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: no request ever leaves the machine
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"the VAE needs diffusers: pip install \"fastdiff[latent]\" ({exc})") from None
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def _read_config(config) -> dict:
    if config is None:
        return dict(SD_VAE_CONFIG)
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            data = json.loads(f.read(_MAX_CONFIG_CHARS + 1))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VAEError(f"VAE config {path}: cannot read a JSON config ({exc})") from None
    except RecursionError:
        raise VAEError(f"VAE config {path}: the JSON is nested too deeply to be a VAE config") from None
    if not isinstance(data, dict):
        raise VAEError(f"VAE config {path}: expected a JSON object")
    return data


_MAX_CONFIG_CHARS = 1 << 20  # a VAE config is a few hundred bytes


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_config(cfg: dict, where: str) -> None:
    """The config values an ``AutoencoderKL`` is built from, checked so that a bad one is one clear line (not
    a ZeroDivisionError or IndexError from inside diffusers)."""
    name = cfg.get("_class_name")
    if name is not None and name != "AutoencoderKL":
        raise VAEError(f"{where}: _class_name is {name!r}, not 'AutoencoderKL' (the Stable Diffusion VAE)")
    channels = cfg.get("block_out_channels", (64,))
    if not isinstance(channels, (list, tuple)) or not channels or not all(_positive_int(c) for c in channels):
        raise VAEError(f"{where}: block_out_channels must be a non-empty list of positive integers, got "
                       f"{channels!r:.80}")
    for key in ("norm_num_groups", "latent_channels", "layers_per_block", "in_channels", "out_channels"):
        if key in cfg and not _positive_int(cfg[key]):
            raise VAEError(f"{where}: {key} must be a positive integer, got {cfg[key]!r:.80}")
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in channels):
        raise VAEError(f"{where}: norm_num_groups ({groups}) must divide every block_out_channels ({list(channels)})")
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and (not isinstance(cfg[key], (list, tuple)) or len(cfg[key]) != len(channels)):
            raise VAEError(f"{where}: {key} must list one block per block_out_channels entry ({len(channels)}), "
                           f"got {cfg[key]!r:.80}")


def _model_shapes(cfg: dict, where: str) -> dict[str, tuple]:
    """The tensor shapes of the ``AutoencoderKL`` the config describes, built on the meta device (no memory:
    a config asking for billions of parameters costs nothing here)."""
    _check_config(cfg, where)
    AutoencoderKL = _diffusers().AutoencoderKL
    try:
        with torch.device("meta"):
            model = AutoencoderKL.from_config(cfg)
    except Exception as exc:  # diffusers' own checks raise many types
        raise VAEError(f"{where}: cannot build an AutoencoderKL from the config ({type(exc).__name__}: {exc})") \
            from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _file_shapes(path: str) -> dict[str, tuple]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise VAEError(f"{path}: not a safetensors file ({exc})") from None


_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _current_name(key: str) -> str:
    """diffusers' older attention names (``query``, ``proj_attn``...), which it renames when loading."""
    if ".attentions." in key:
        for old, new in _OLD_ATTENTION.items():
            if old in key:
                return key.replace(old, new)
    return key


def _squeezed(shape: tuple) -> tuple:
    while len(shape) > 2 and shape[-1] == 1:  # a 1x1 convolution's weight holds a linear layer's
        shape = shape[:-1]
    return shape


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_weights(cfg: dict, weights: str, where: str) -> None:
    """The weights file (diffusers' names) against the config, before anything is allocated: the same tensor
    names (missing or unexpected ones named) and shapes."""
    want = _model_shapes(cfg, where)
    have = {_current_name(k): s for k, s in _file_shapes(weights).items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_few(unexpected)})"] if unexpected else [])
        raise VAEError(f"{weights}: the weights do not fit the VAE config {where}: tensors " + ", ".join(parts))
    bad = [k for k in want if _squeezed(want[k]) != _squeezed(have[k])]
    if bad:
        raise VAEError(f"{weights}: the weights do not fit the VAE config {where}: {bad[0]} is {list(have[bad[0]])} "
                       f"in the file, the config makes {list(want[bad[0]])} ({len(bad)} such tensors)")


def _check_finite(model, where: str) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise VAEError(f"{where}: the VAE weight {name} holds {bad} of {t.numel()} values that are not finite "
                           "(NaN or Inf); the file is damaged")


def _load_autoencoder(path, config=None):
    model = _load_unchecked(path, config)
    _check_finite(model, os.fspath(path))
    return model


def _load_unchecked(path, config=None):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no VAE at {path!r}: give a local folder (diffusers layout) or a .safetensors "
                                f"file; {_HOW_TO_GET}")
    AutoencoderKL = _diffusers().AutoencoderKL
    kw = dict(local_files_only=True, low_cpu_mem_usage=False)
    if os.path.isdir(path):
        for sub in ("", "vae"):
            folder = os.path.join(path, sub) if sub else path
            if os.path.isfile(os.path.join(folder, "config.json")):
                if not os.path.isfile(os.path.join(folder, _WEIGHTS)):
                    raise VAEError(f"{folder}: has config.json but no {_WEIGHTS} (only safetensors weights are "
                                   f"read; pickled .bin weights can run code)")
                config_path = os.path.join(folder, "config.json")
                _check_weights(_read_config(config_path), os.path.join(folder, _WEIGHTS), config_path)
                try:
                    return AutoencoderKL.from_pretrained(folder, use_safetensors=True, **kw)
                except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                    raise VAEError(f"{folder}: not a diffusers AutoencoderKL folder ({exc})") from None
        raise VAEError(f"{path}: no config.json (nor vae/config.json): not a diffusers VAE folder; {_HOW_TO_GET}")
    if not path.lower().endswith(".safetensors"):
        raise VAEError(f"{path}: expected a .safetensors file or a diffusers folder (pickled weights such as "
                       f".ckpt / .pt / .bin are refused: loading them can run code)")
    from safetensors.torch import load_file

    shapes = _file_shapes(path)
    keys = list(shapes)
    cfg = _read_config(config)
    where = "(the Stable Diffusion VAE's)" if config is None else \
        f"({'given' if isinstance(config, dict) else os.fspath(config)})"
    if any(k.startswith("encoder.down_blocks.") for k in keys):  # already in diffusers' naming
        _check_weights(cfg, path, where)
        model = AutoencoderKL.from_config(cfg)
        try:
            model.load_state_dict(load_file(path), strict=True)
        except RuntimeError as exc:
            raise VAEError(f"{path}: the weights do not fit the VAE config ({exc})") from None
        return model
    if not any(k.startswith(("encoder.down.", "first_stage_model.encoder.down.")) for k in keys):
        raise VAEError(f"{path}: no VAE encoder weights (encoder.down... or encoder.down_blocks...) found")
    # Other names (the original LDM's): at least the config's number of values must be in the file, before
    # a model of the config's size is built.
    need = sum(math.prod(s) for s in _model_shapes(cfg, where).values())
    held = sum(math.prod(s) for k, s in shapes.items() if "model_ema." not in k)
    if need > held:
        raise VAEError(f"{path}: the VAE config {where} makes {need:,} parameters, but the file holds only {held:,} "
                       "values: the weights do not fit it")
    with tempfile.TemporaryDirectory(prefix="fastdiff-vae-config.") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        try:
            return AutoencoderKL.from_single_file(path, config=tmp, **kw)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise VAEError(f"{path}: cannot read it as a Stable Diffusion VAE checkpoint ({exc})") from None


class VAE:
    """EDM2's VAE stage around a diffusers ``AutoencoderKL`` (module docstring). ``batch_size`` images (or
    latents) go through the VAE at a time; ``scaling``: the latent normalization (default EDM2's).

    * :meth:`VAE.encode`: uint8 pixels ``[N, 3, H, W]`` -> the encoder's posterior mean and std, concatenated to
      ``[N, 8, H/8, W/8]`` float32 ("raw latents", what a latent dataset stores; :func:`fastdiff.data.latent`).
      The pixels enter the VAE as ``x / 255`` in ``[0, 1]``, as the official encoder feeds them (the official
      latents and networks were made that way, so fastdiff keeps it).
    * :meth:`VAE.sample_latents`: one latent per image from the stored mean/std, normalized per channel with
      EDM2's constants (:class:`fastdiff.data.latent.LatentScaling`).
    * :meth:`VAE.decode`: the network's latents -> uint8 pixels: undo the normalization, run the VAE decoder,
      ``clamp(0, 1) * 255`` truncated to uint8 (the official decoding).

    The VAE is read from a local folder in the diffusers layout (``config.json`` and
    ``diffusion_pytorch_model.safetensors``; a Stable Diffusion pipeline folder's ``vae/`` is found too) or from a
    single ``.safetensors`` file (e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``, in the original LDM naming, or
    a diffusers state dict); a single file is built with the Stable Diffusion VAE configuration
    (:data:`SD_VAE_CONFIG`) unless ``config`` says otherwise. Nothing is ever downloaded: the hub is switched
    off (``HF_HUB_OFFLINE``) and every load is ``local_files_only``. Pickled weights (``.ckpt``, ``.bin``,
    ``.pt``) are refused, since loading them can run code.
    """

    def __init__(self, model, scaling: LatentScaling | None = None, batch_size: int = 8, device="cpu"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False).to(device)
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.model.float()  # the official encoder runs the VAE in float32
        self.scaling = OFFICIAL_SCALING if scaling is None else scaling
        self.batch_size = int(batch_size)
        cfg = model.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # pixels per latent, per side
        if self.scaling.channels != self.latent_channels:
            raise VAEError(f"the latent scaling has {self.scaling.channels} channels, the VAE "
                           f"{self.latent_channels}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` (H, W multiples of :attr:`factor`) -> float32 ``[N, 2C, H/f, W/f]`` on the CPU:
        the posterior means, then the stds (``exp(logvar / 2)``)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[1] != 3:
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VAE.encode: expected uint8 RGB images [N, 3, H, W], got {what}")
        h, w = images.shape[2:]
        if h % self.factor or w % self.factor or h == 0 or w == 0:
            raise ValueError(f"VAE.encode: image size {w}x{h} must be a positive multiple of {self.factor}")
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32) / 255
            dist = self.model.encode(x).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
        if not out:
            return torch.empty((0, 2 * self.latent_channels, h // self.factor, w // self.factor))
        return torch.cat(out)

    def sample_latents(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The network's latents from stored mean/std (:meth:`LatentScaling.sample`)."""
        return self.scaling.sample(mean_std, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The network's latents ``[N, C, h, w]`` -> uint8 pixels ``[N, 3, h*f, w*f]`` on the CPU (a ``decoder``
        for :func:`fastdiff.sampling.generate_images`)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            what = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"VAE.decode: expected latents [N, {self.latent_channels}, h, w], got {what}")
        out = []
        for chunk in latents.split(self.batch_size):
            raw = self.scaling.denormalize(chunk.to(self.device))
            pixels = self.model.decode(raw).sample
            out.append(pixels.float().clamp(0, 1).mul(255).to(torch.uint8).cpu())
        if not out:
            h, w = latents.shape[2:]
            return torch.empty((0, 3, h * self.factor, w * self.factor), dtype=torch.uint8)
        return torch.cat(out)


def load_vae(path, device="cpu", batch_size: int = 8, scaling: LatentScaling | None = None, config=None) -> VAE:
    """:class:`VAE` from a local folder or ``.safetensors`` file (module docstring); ``config``: a diffusers
    config (dict, JSON file or folder) for a single file that is not the Stable Diffusion VAE."""
    return VAE(_load_autoencoder(path, config), scaling=scaling, batch_size=batch_size, device=device)


def fingerprint(path) -> str:
    """A cheap identity of a VAE on disk (its absolute path and the sizes of its files), e.g. to check that a
    resumed encode uses the same VAE."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        return f"{path} ({os.path.getsize(path)} bytes)"
    sizes = []
    for root, _dirs, files in os.walk(path):
        for f in sorted(files):
            full = os.path.join(root, f)
            sizes.append(f"{os.path.relpath(full, path)}:{os.path.getsize(full)}")
    return f"{path} ({', '.join(sorted(sizes))})"
