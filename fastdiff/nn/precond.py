"""EDM preconditioning (EDM Eq. 7) around the EDM2 U-Net, with the learned uncertainty ``logvar`` (EDM2 Eq. 21)."""

from __future__ import annotations

import torch

from fastdiff._runtime import DTYPE_NAMES
from fastdiff._runtime import is_compiling as _is_compiling
from fastdiff.diffusion import precond_coefficients, sigma_per_sample
from fastdiff.nn.layers import MPConv, MPFourier, force_normalize_
from fastdiff.nn.unet import UNet

__all__ = ["Precond"]


_NET_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and DTYPE_NAMES.get(dtype.replace("torch.", "")) in _NET_DTYPES:
        return DTYPE_NAMES[dtype.replace("torch.", "")]
    raise ValueError(f"Precond: expected dtype None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")


class Precond(torch.nn.Module):
    """``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels)`` around the EDM2 ``UNet``.

    Reduced precision: with ``use_fp16=True`` the U-Net runs in float16 on CUDA (as the official release
    does: activations cast, MP weights normalized in float32 then cast); on the CPU it stays in float32.
    ``dtype=torch.bfloat16`` (or float16) asks for that reduced dtype explicitly, on any device.
    ``force_fp32=True`` in ``forward`` overrides both. Inputs and outputs are float32.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        dtype=None,
        **unet_kwargs,
    ):
        super().__init__()
        dtype = _as_dtype(dtype)
        # The constructor arguments, for checkpoints (fastdiff.io.save_network).
        self.init_kwargs = dict(
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=label_dim,
            use_fp16=use_fp16,
            sigma_data=sigma_data,
            logvar_channels=logvar_channels,
            **({"dtype": str(dtype).replace("torch.", "")} if dtype is not None else {}),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_kwargs.items()},
        )
        self.preset = None
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.dtype = dtype
        self.sigma_data = float(sigma_data)
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())
        self.logvar_linear._normalized_by_parent = True

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """The dtype the U-Net runs in for inputs on ``device``."""
        if force_fp32:
            return torch.float32
        if self.dtype is not None:
            return self.dtype
        if self.use_fp16 and device.type == "cuda":
            return torch.float16
        return torch.float32

    def _prepare_sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sigma = sigma_per_sample(sigma, n, device=x.device, dtype=torch.float32, image_shaped=True, who="Precond")
        return sigma.reshape(-1, 1, 1, 1)

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, return_logvar: bool = False):
        self.unet.check_image(x, "Precond")
        x = x.to(torch.float32)
        sigma = self._prepare_sigma(sigma, x)
        labels = self.unet.prepare_labels(class_labels, x.shape[0], x.device, "Precond")
        dtype = self.compute_dtype(x.device, force_fp32)

        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        x_in = (c_in * x).to(dtype)
        f_x = self.unet(x_in, c_noise.flatten(), labels)
        d_x = c_skip * x + c_out * f_x.to(torch.float32)
        if return_logvar:
            if self.training and _is_compiling():
                force_normalize_([self.logvar_linear.weight])
            logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
            return d_x, logvar
        return d_x

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, sigma_data={self.sigma_data}, use_fp16={self.use_fp16}, dtype={self.dtype}"
