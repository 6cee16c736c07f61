"""Test stand-ins for the network and the loss (until fastdiff.nn / fastdiff.diffusion land), with the
official call signatures: ``net(x, sigma, labels, return_logvar=True) -> (D, logvar)`` and
``loss_fn(net, images, labels, generator=None) -> per-element loss``.

Also a custom preset for ``fastdiff train --preset _standin:tiny`` (tests put this folder on PYTHONPATH).
"""

from __future__ import annotations

import math

import torch


class StandinPrecond(torch.nn.Module):
    """A tiny EDM-preconditioned conv net with learned uncertainty and forced weight normalization."""

    def __init__(self, img_resolution=8, img_channels=3, label_dim=10, model_channels=8, dropout=0.0,
                 sigma_data=0.5, logvar_channels=8):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                model_channels=model_channels, dropout=dropout)
        c = model_channels
        self.conv_in = torch.nn.Parameter(torch.randn(c, img_channels + 1, 3, 3))
        self.emb_noise = torch.nn.Parameter(torch.randn(c, logvar_channels))
        self.emb_label = torch.nn.Parameter(torch.randn(c, max(label_dim, 1)))
        self.conv_out = torch.nn.Parameter(torch.randn(img_channels, c, 3, 3))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.logvar_linear = torch.nn.Parameter(torch.randn(1, logvar_channels))
        self.register_buffer("freqs", 2 * math.pi * torch.randn(logvar_channels, generator=torch.Generator().manual_seed(7)))
        self.register_buffer("phases", 2 * math.pi * torch.rand(logvar_channels, generator=torch.Generator().manual_seed(8)))
        self.dropout = dropout

    def _fourier(self, c_noise):
        return math.sqrt(2) * torch.cos(c_noise[:, None] * self.freqs[None] + self.phases[None])

    @staticmethod
    def _norm(w, eps=1e-4):
        n = torch.linalg.vector_norm(w.float(), dim=list(range(1, w.ndim)), keepdim=True)
        return w / (eps + n / math.sqrt(w[0].numel()))

    def _w(self, p):
        if self.training:
            with torch.no_grad():
                p.copy_(self._norm(p))  # forced weight normalization
        return self._norm(p) / math.sqrt(p[0].numel())

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        four = self._fourier(c_noise)
        emb = four @ self._w(self.emb_noise).t()
        if self.label_dim and class_labels is not None:
            emb = (emb + class_labels.to(torch.float32) @ self._w(self.emb_label).t() * math.sqrt(self.label_dim)) / math.sqrt(2)
        h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
        h = torch.nn.functional.conv2d(h, self._w(self.conv_in).to(h.dtype), padding=1)
        h = torch.nn.functional.silu(h * (1 + emb[:, :, None, None].to(h.dtype))) / 0.596
        if self.dropout:
            h = torch.nn.functional.dropout(h, p=self.dropout, training=self.training)
        f = torch.nn.functional.conv2d(h, self._w(self.conv_out).to(h.dtype), padding=1) * self.out_gain
        d = c_skip * x + c_out * f.to(torch.float32)
        if return_logvar:
            logvar = (four @ self._w(self.logvar_linear).t()).reshape(-1, 1, 1, 1)
            return d, logvar
        return d


class StandinLoss:
    """The EDM2 loss: ``ln s ~ N(P_mean, P_std^2)``, ``lambda / exp(u) * (D - y)^2 + u``."""

    def __init__(self, P_mean=-0.8, P_std=1.6, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, labels=None, generator=None):
        rnd = torch.randn([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
        sigma = (rnd * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn(images.shape, device=images.device, generator=generator) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar

    def __repr__(self):
        return f"StandinLoss(P_mean={self.P_mean}, P_std={self.P_std})"


def tiny(**overrides):
    """Custom preset for ``--preset _standin:tiny``: the network, the loss and training defaults."""
    torch.manual_seed(overrides.pop("init_seed", 0))
    net = StandinPrecond(**overrides)
    return {"net": net, "loss": StandinLoss(),
            "training": {"lr": 0.01, "lr_decay": 0, "batch": 16, "duration": 256, "rampup_mimg": 0,
                         "P_mean": -0.8, "P_std": 1.6}}


def _main(argv=None):
    """Under torchrun: ``python -m torch.distributed.run --nproc_per_node 2 tests/_standin.py OUTDIR DURATION BATCH
    BATCH_GPU [LABEL_DROPOUT]``; trains the tiny stand-in and saves every rank's final weights as
    ``rank<r>.safetensors``."""
    import sys

    from safetensors.torch import save_file

    from fastdiff.data import open_dataset
    from fastdiff.training import TrainConfig, training_loop
    from fastdiff import _dist as D

    argv = sys.argv[1:] if argv is None else argv
    outdir, duration, batch, batch_gpu = argv[:4]
    label_dropout = float(argv[4]) if len(argv) > 4 else 0.0
    info = D.init_distributed("cpu")
    made = tiny()
    net = made["net"]
    if info.rank == 1:  # a different initialization: DDP must broadcast rank 0's
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    ds = open_dataset("builtin:shapes?n=48&seed=2", resolution=8, channels=3)
    cfg = TrainConfig(batch=int(batch), batch_gpu=int(batch_gpu), duration=int(duration), status=32, snapshot=32,
                      checkpoint=0, lr=0.01, lr_decay=0, rampup_mimg=0, seed=1, workers=0, progress=False,
                      label_dropout=label_dropout)
    training_loop(net, made["loss"], ds, outdir, cfg)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{outdir}/rank{info.rank}.safetensors")
    D.shutdown_distributed(info)


if __name__ == "__main__":
    _main()
