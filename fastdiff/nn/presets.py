"""Model presets as data: network constructor arguments, loss and training defaults.

The EDM2 presets follow the official release's configurations (``train_edm2.py``): img512 = 4x64x64 VAE
latents, img64 = 3x64x64 pixels, 1000 ImageNet classes, channel_mult [1, 2, 3, 4], 3 blocks per level,
attention at 16 and 8. Dropout: 0 for XS and S, 0.10 for M and larger. ``edm2-img64-xs`` has no official
counterpart (the release trains img64 S-XL); it uses the XS settings of img512 with the img64 noise
distribution. ``tiny-16`` and ``small-32`` are small CPU presets for tests, demos and benchmarks.

Training entries: ``lr`` (alpha_ref), ``lr_decay`` (t_ref, steps), ``batch``, ``duration`` (training images),
``P_mean``, ``P_std`` (loss noise distribution).
"""

from __future__ import annotations

import copy

__all__ = ["PRESETS", "build", "get_preset", "preset_names"]

_M = 1 << 20  # "Mi" images


def _edm2(res_kind: str, channels: int, dropout: float, lr: float, duration_mi: int) -> dict:
    if res_kind == "img512":
        network = dict(img_resolution=64, img_channels=4, label_dim=1000)
        noise = dict(P_mean=-0.4, P_std=1.0)
        lr_decay = 70000
    else:
        network = dict(img_resolution=64, img_channels=3, label_dim=1000)
        noise = dict(P_mean=-0.8, P_std=1.6)
        lr_decay = 35000
    network.update(model_channels=channels, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
                   dropout=dropout)
    return dict(network=network,
                training=dict(lr=lr, lr_decay=lr_decay, batch=2048, duration=duration_mi * _M, **noise))


PRESETS: dict[str, dict] = {
    # ImageNet 512x512 (latent 4x64x64).
    "edm2-img512-xs": _edm2("img512", 128, 0.00, 0.0120, 2048),
    "edm2-img512-s": _edm2("img512", 192, 0.00, 0.0100, 2048),
    "edm2-img512-m": _edm2("img512", 256, 0.10, 0.0090, 2048),
    "edm2-img512-l": _edm2("img512", 320, 0.10, 0.0080, 1792),
    "edm2-img512-xl": _edm2("img512", 384, 0.10, 0.0070, 1280),
    "edm2-img512-xxl": _edm2("img512", 448, 0.10, 0.0065, 896),
    # ImageNet 64x64 (pixels 3x64x64).
    "edm2-img64-xs": _edm2("img64", 128, 0.00, 0.0120, 1024),  # not in the official release (see above)
    "edm2-img64-s": _edm2("img64", 192, 0.00, 0.0100, 1024),
    "edm2-img64-m": _edm2("img64", 256, 0.10, 0.0090, 2048),
    "edm2-img64-l": _edm2("img64", 320, 0.10, 0.0080, 1024),
    "edm2-img64-xl": _edm2("img64", 384, 0.10, 0.0070, 640),
    # Small CPU presets.
    "tiny-16": dict(
        network=dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[8], dropout=0.0, logvar_channels=32),
        training=dict(lr=0.0100, lr_decay=2000, batch=64, duration=1 * _M, P_mean=-0.8, P_std=1.6),
    ),
    "small-32": dict(
        network=dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=64, channel_mult=[1, 2, 2],
                     num_blocks=2, attn_resolutions=[16, 8], dropout=0.0, logvar_channels=64),
        training=dict(lr=0.0100, lr_decay=10000, batch=256, duration=16 * _M, P_mean=-0.8, P_std=1.6),
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (``{'network': ..., 'training': ...}``)."""
    if name not in PRESETS:
        raise ValueError(f"fastdiff.nn: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def build(preset_name: str, **overrides):
    """Build the ``Precond`` network of preset ``preset_name``; ``overrides`` replace constructor arguments
    (e.g. ``label_dim=0``, ``dropout=0.1``, ``use_fp16=False``)."""
    from fastdiff.nn.precond import Precond

    kwargs = get_preset(preset_name)["network"]
    kwargs.update(overrides)
    net = Precond(**kwargs)
    net.preset = preset_name
    return net
