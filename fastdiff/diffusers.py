"""diffusers interop, both directions (needs ``pip install diffusers``; nothing here downloads anything).

* :class:`EDM2UNetModel`: a fastdiff EDM2 network as a diffusers model (``ModelMixin`` + ``ConfigMixin``):
  ``save_pretrained`` / ``from_pretrained`` of a local folder, ``from_fastdiff(net)`` / ``to_fastdiff()``. It
  takes what diffusers' EDM schedulers feed a model: the ``scale_model_input`` output ``c_in x``, the timestep
  ``precondition_noise(sigma) = ln(sigma) / 4`` and class labels, and returns the raw U-Net output ``F`` that the
  scheduler's ``precondition_outputs`` turns into ``D = c_skip x + c_out F``. EDM2's preconditioning (Karras et
  al. 2024, Eq. 7-10 of EDM with ``sigma_data``) is exactly those schedulers', so ``EDMEulerScheduler`` and
  ``EDMDPMSolverMultistepScheduler`` drive the network unchanged, on fastdiff's fused kernels.
* :class:`EDM2Pipeline`: a ``DiffusionPipeline`` for class-conditional (or unconditional) sampling with a
  diffusers EDM scheduler or any fastdiff sampler by name, any fastdiff guidance object (CFG, Autoguidance
  with another pipeline's network, Interval, APG, CADS...), per-sample generators, ``output_type``
  ``pil`` / ``np`` / ``pt`` / ``latent``.
* :class:`DiffusersDenoiser`: a diffusers eps-, v- or sample-prediction model (``UNet2DModel``,
  ``DiTTransformer2DModel``, class-conditional or not) with its scheduler's noise table as a fastdiff denoiser
  ``D(x, sigma, labels)``, so that fastdiff's samplers and guidance (two-network autoguidance, the guidance
  interval in sigma, APG on the denoised output...) run on diffusers models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("fastdiff.diffusers needs the diffusers package: pip install diffusers") from exc

__all__ = ["EDM2UNetModel", "EDM2UNetOutput", "EDM2Pipeline", "DiffusersDenoiser"]

_TOP_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")


class EDM2UNetOutput(dict):
    """``.sample``: the U-Net's raw output ``F`` (what diffusers' EDM schedulers call ``model_output``)."""

    def __init__(self, sample: torch.Tensor):
        super().__init__(sample=sample)
        self.sample = sample

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)

    def to_tuple(self):
        return (self.sample,)


class EDM2UNetModel(ModelMixin, ConfigMixin):
    """A fastdiff EDM2 network (``fastdiff.nn.Precond``) as a diffusers model.

    ``forward(sample, timestep, class_labels=None)``: ``sample`` the scheduler's ``scale_model_input`` output
    (``c_in x``), ``timestep`` the scheduler's timestep (``c_noise = ln(sigma) / 4``, a number, 0-d or ``[N]``),
    ``class_labels`` class indices ``[N]`` or one-hot rows (an all-zero row: no class); returns the U-Net output
    ``F`` (``.sample``). :meth:`denoise` is the whole preconditioned ``D(x; sigma)``. The config is the network's
    constructor arguments; the weights are the network's state dict under ``net.``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, img_resolution: int = 64, img_channels: int = 3, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, unet_dtype: str | None = None,
                 unet_kwargs: dict | None = None):
        super().__init__()
        from fastdiff import nn as fnn

        kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                      sigma_data=sigma_data, logvar_channels=logvar_channels, **(unet_kwargs or {}))
        if unet_dtype is not None:  # Precond(dtype=...): the U-Net's reduced precision, e.g. 'bfloat16'
            kwargs["dtype"] = unet_dtype
        self.net = fnn.Precond(**kwargs)

    # --- fastdiff <-> diffusers ------------------------------------------------------------------------------

    @classmethod
    def from_fastdiff(cls, net: torch.nn.Module) -> EDM2UNetModel:
        """Wrap a fastdiff ``Precond`` (shared, not copied: the same parameters)."""
        from fastdiff import nn as fnn

        if not isinstance(net, fnn.Precond):
            raise TypeError(f"from_fastdiff expects a fastdiff.nn.Precond, got {type(net).__name__}")
        kw = dict(net.init_kwargs)
        top = {k: kw.pop(k) for k in _TOP_KWARGS if k in kw}
        with torch.device("meta"):
            model = cls(**top, unet_dtype=kw.pop("dtype", None), unet_kwargs=kw)
        model.net = net
        return model

    def to_fastdiff(self) -> torch.nn.Module:
        """The fastdiff ``Precond`` inside (shared, not copied): ``D = net(x, sigma, labels)``."""
        return self.net

    # --- what the schedulers call ------------------------------------------------------------------------------

    @property
    def label_dim(self) -> int:
        return self.net.label_dim

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        net = self.net
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        elif t.numel() != n:
            raise ValueError(f"EDM2UNetModel: timestep must be one value or one per sample ({n}), got {t.numel()}")
        labels = net.unet.prepare_labels(class_labels, n, sample.device, "EDM2UNetModel")
        dtype = net.compute_dtype(sample.device)
        out = net.unet(sample.to(dtype), t, labels).to(sample.dtype)
        return EDM2UNetOutput(out) if return_dict else (out,)

    def denoise(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """The preconditioned denoiser ``D(x; sigma)`` (fastdiff's ``net(x, sigma, labels)``)."""
        return self.net(x, sigma, class_labels)


def _with_fastdiff_networks(guidance, depth: int = 0):
    """``guidance`` with every :class:`EDM2UNetModel` it holds (``Autoguidance(guide=other_pipe.unet)``,
    ``CFG(uncond=...)``, inside ``Interval`` / ``CADS``...) replaced by its fastdiff network, which computes
    ``D(x; sigma)`` where the diffusers model returns the raw ``F``; a shallow copy, the caller's object is
    left as it is."""
    import copy

    from fastdiff.sampling.guidance import Guidance

    if not isinstance(guidance, Guidance) or depth > 8:
        return guidance
    out = None
    for k, v in vars(guidance).items():
        new = v.to_fastdiff() if isinstance(v, EDM2UNetModel) else _with_fastdiff_networks(v, depth + 1)
        if new is not v:
            out = out or copy.copy(guidance)
            setattr(out, k, new)
    return out or guidance


def _class_indices(class_labels, n: int | None, device) -> torch.Tensor | None:
    if class_labels is None:
        return None
    if isinstance(class_labels, int):
        class_labels = [class_labels] * (n or 1)
    labels = torch.as_tensor(class_labels, device=device)
    if labels.ndim == 0:
        labels = labels.reshape(1)
    return labels


class EDM2Pipeline(DiffusionPipeline):
    """Sampling an :class:`EDM2UNetModel` the diffusers way.

    ``pipe = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(net), scheduler=EDMEulerScheduler())``;
    ``pipe(class_labels=[1, 7], num_inference_steps=32, generator=[torch.Generator().manual_seed(s) for s in
    seeds]).images``. ``sampler='heun'`` (any name of ``fastdiff.sampling.SAMPLERS``) samples with fastdiff's
    sampler on the EDM schedule (``sigma_min``, ``sigma_max``, ``rho``) instead of the scheduler; the default is
    the scheduler when there is one, else ``'heun'``. ``guidance``: any ``fastdiff.sampling.guidance`` object
    (e.g. ``Autoguidance(guide=small_pipe.unet, weight=2.0)``: a diffusers model it holds stands for its fastdiff
    network), with either. ``generator``: one generator, or one per sample (a sample then depends on its own
    generator only). ``latents``: the starting standard-normal noise instead. ``sampler_options`` go to ``fastdiff.sampling.sample`` (``S_churn``,
    ``eta``...). ``vae``: a diffusers ``AutoencoderKL`` that decodes a latent network's samples (EDM2's VAE
    stage: ``fastdiff.vae.VAE`` with the network's latent scaling, EDM2's by default). Returns
    ``ImagePipelineOutput(images=...)`` (or a 1-tuple with ``return_dict=False``).
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["scheduler", "vae"]  # without a scheduler: fastdiff's samplers

    def __init__(self, unet: EDM2UNetModel, scheduler=None, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int | None = None, num_inference_steps: int = 32,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, sampler: str | None = None, guidance=None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, output_type: str = "pil",
                 return_dict: bool = True, **sampler_options):
        net = self.unet.to_fastdiff()
        device = self._execution_device
        labels = _class_indices(class_labels, batch_size, device)
        if net.label_dim and labels is None:
            raise ValueError(f"the network is class-conditional ({net.label_dim} classes): give class_labels")
        if not net.label_dim and labels is not None:
            raise ValueError("class_labels given but the network is unconditional (label_dim = 0)")
        n = len(labels) if labels is not None else (batch_size if batch_size is not None else
                                                     (len(generator) if isinstance(generator, (list, tuple)) else 1))
        if batch_size is not None and n != batch_size:
            raise ValueError(f"batch_size={batch_size} but {n} class labels")
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for a batch of {n}; give one per sample (or one)")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        shape = (n, net.img_channels, net.img_resolution, net.img_resolution)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)
        onehot = None if labels is None else torch.nn.functional.one_hot(labels.long(), net.label_dim).float()
        guidance = _with_fastdiff_networks(guidance)
        if sampler is None and self.scheduler is not None:
            if sampler_options:
                raise ValueError(f"{', '.join(sampler_options)}: options of fastdiff's samplers, but this run uses the "
                                 f"scheduler {type(self.scheduler).__name__}; pass sampler='heun' (or another) too")
            x = self._scheduler_loop(latents, labels, onehot, num_inference_steps, guidance)
        else:
            x = self._fastdiff_loop(latents, onehot, sampler or "heun", num_inference_steps, guidance, generator,
                                    sigma_min, sigma_max, rho, sampler_options)
        if output_type == "latent":
            images = x
        else:
            from diffusers.image_processor import VaeImageProcessor

            from fastdiff.data.latent import scaling_of

            scaling = scaling_of(net)
            if scaling is not None or net.img_channels == 4:  # latents: EDM2's VAE stage decodes them
                if self.vae is None:
                    raise ValueError(f"the network makes {net.img_channels}-channel latents: give the pipeline a "
                                     "vae (diffusers AutoencoderKL, e.g. a local sd-vae-ft-mse) or use "
                                     "output_type='latent'")
                from fastdiff.vae import VAE

                pixels = VAE(self.vae, scaling=scaling, device=x.device).decode(x)
                images = VaeImageProcessor(do_normalize=False).postprocess(pixels.float() / 255, output_type)
            elif net.img_channels not in (1, 3):
                raise ValueError(f"the network makes {net.img_channels}-channel samples: use output_type='latent'")
            else:
                images = VaeImageProcessor(do_normalize=True).postprocess(x.float().cpu(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _scheduler_loop(self, latents, labels, onehot, steps, guidance):
        """The diffusers loop. With a guidance object, each step's model output is the one whose
        ``precondition_outputs`` is the guided ``D`` (fastdiff's guidance on fastdiff's loop context)."""
        from fastdiff.sampling._loop import Loop

        sched = self.scheduler
        sched.set_timesteps(steps, device=latents.device)
        x = latents * sched.init_noise_sigma
        run = None
        if guidance is not None:
            sigmas = sched.sigmas.to(torch.float32)
            run = Loop(self.unet.to_fastdiff(), x, sigmas, guidance=guidance, labels=onehot,
                       schedule=(float(sigmas[-2] if float(sigmas[-1]) == 0 else sigmas[-1]), float(sigmas[0]), 7.0))
        for i, t in enumerate(self.progress_bar(sched.timesteps)):
            x_in = sched.scale_model_input(x, t)
            if run is None:
                out = self.unet(x_in, t, labels).sample
            else:
                sigma = sched.sigmas[sched.step_index if sched.step_index is not None else i].to(x.device)
                d = run.denoise(x, sigma.to(x.dtype), i)
                c_skip = sched.precondition_outputs(torch.ones_like(x[:1]), torch.zeros_like(x[:1]), sigma)
                c_out = sched.precondition_outputs(torch.zeros_like(x[:1]), torch.ones_like(x[:1]), sigma)
                out = (d - c_skip * x) / c_out
            x = sched.step(out, t, x).prev_sample
        return x

    def _fastdiff_loop(self, latents, onehot, sampler, steps, guidance, generator, sigma_min, sigma_max, rho,
                       options):
        from fastdiff.sampling import sample

        gens = list(generator) if isinstance(generator, (list, tuple)) else None
        randn_like = None
        if isinstance(generator, torch.Generator):
            def randn_like(like, g=generator):
                return torch.randn(like.shape, generator=g, device=g.device, dtype=like.dtype).to(like.device)
        total = steps if sampler != "dpm_adaptive" else None
        with self.progress_bar(total=total) as bar:
            return sample(self.unet.to_fastdiff(), latents, sampler, steps, guidance=guidance, labels=onehot,
                          generators=gens, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, randn_like=randn_like,
                          callback=lambda i, x, d: bar.update(1), **options)


# --- diffusers models as fastdiff denoisers ------------------------------------------------------------------------


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers model with its scheduler's noise table as a fastdiff denoiser ``D(x, sigma, labels)``.

    The scheduler gives ``alphas_cumprod`` (DDPM, DDIM, Euler... schedulers): noise levels ``sigma_k =
    sqrt((1 - abar_k) / abar_k)`` of the VE view ``x = x_0 + sigma n`` (Karras et al. 2022, Sec. 2 and Table 1:
    the VP sample is ``x / sqrt(1 + sigma^2)``), and ``config.prediction_type``. For a noise level ``sigma``
    the model gets ``x / sqrt(1 + sigma^2)`` and the timestep ``t(sigma)``, the inverse of the table
    (interpolated linearly in sigma, or in log sigma, as the scheduler places fractional timesteps:
    ``timestep_interpolation='auto'`` follows its config), or ``ln(sigma) / 4`` for a scheduler with
    ``timestep_type='continuous'``; its output becomes ``D``: ``x - sigma eps`` (epsilon),
    ``x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v`` (v_prediction) or the output itself (sample). A model
    that also predicts its variance (``out_channels = 2 in_channels``, DiT) has it dropped. Noise levels beyond
    the table's ends (``sigma_min``, ``sigma_max`` here) get the end timesteps.

    Labels: fastdiff's one-hot rows become class indices (``class_labels=``); an all-zero row (the null label
    of CFG) becomes ``null_class`` (default: a DiT's extra 'no class' embedding ``num_classes``; else none,
    and a null label is an error). An unconditional model ignores labels.
    """

    def __init__(self, model: torch.nn.Module, scheduler, prediction_type: str | None = None,
                 timestep_interpolation: str = "auto", num_classes: int | None = None, null_class: int | None = None):
        super().__init__()
        self.model = model
        config = getattr(scheduler, "config", {})
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod noise table; DiffusersDenoiser takes a "
                             "DDPM-style scheduler (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, ...)")
        ac = torch.as_tensor(ac, dtype=torch.float64)
        self.register_buffer("sigma_table", ((1 - ac) / ac).sqrt(), persistent=False)
        self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got "
                             f"{self.prediction_type!r}")
        self.continuous = config.get("timestep_type") == "continuous"
        if timestep_interpolation == "auto":
            log = any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
            log = log or config.get("interpolation_type") == "log_linear" or "interpolation_type" not in config
            timestep_interpolation = "log" if log else "linear"
        if timestep_interpolation not in ("linear", "log"):
            raise ValueError(f"timestep_interpolation must be 'auto', 'linear' or 'log', got {timestep_interpolation!r}")
        self.interpolation = timestep_interpolation
        mcfg = getattr(model, "config", {})
        if num_classes is None:
            num_classes = mcfg.get("num_class_embeds") or (mcfg.get("num_embeds_ada_norm")
                                                          if "num_embeds_ada_norm" in mcfg else None)
        self.num_classes = int(num_classes or 0)
        if null_class is None and "num_embeds_ada_norm" in mcfg and self.num_classes:
            null_class = self.num_classes  # DiT: the class-dropout embedding
        self.null_class = null_class
        # What fastdiff's tools read off a network
        self.label_dim = self.num_classes
        self.img_channels = int(mcfg.get("in_channels", 0) or 0)
        size = mcfg.get("sample_size", 0)
        self.img_resolution = int(size[0] if isinstance(size, (list, tuple)) else size or 0)
        self.sigma_min = float(self.sigma_table[0])
        self.sigma_max = float(self.sigma_table[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep of noise level ``sigma`` (``[N]``, float64)."""
        sigma = sigma.to(torch.float64)
        if self.continuous:
            return 0.25 * sigma.log()
        table = self.sigma_table.to(sigma.device)
        a, b = (table.log(), sigma.clamp_min(1e-30).log()) if self.interpolation == "log" else (table, sigma)
        b = b.clamp(a[0], a[-1])
        hi = torch.searchsorted(a, b).clamp(1, len(a) - 1)
        lo = hi - 1
        w = (b - a[lo]) / (a[hi] - a[lo])
        return lo.to(torch.float64) + w

    def convert_labels(self, labels, n):
        if labels is None or not self.num_classes:
            return None
        if not labels.is_floating_point() and labels.ndim == 1:
            return labels.long()
        if labels.ndim != 2 or labels.shape[1] != self.num_classes:
            raise ValueError(f"expected one-hot labels [N, {self.num_classes}], got {tuple(labels.shape)}")
        index = labels.argmax(dim=1)
        null = labels.abs().sum(dim=1) == 0
        if bool(null.any()):
            if self.null_class is None:
                raise ValueError("an all-zero (null) label needs null_class= (the model's 'no class' index)")
            index = torch.where(null, torch.full_like(index, self.null_class), index)
        return index.expand(n) if index.shape[0] == 1 else index

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        from fastdiff.diffusion import sigma_per_sample

        n = x.shape[0]
        sigma = sigma_per_sample(sigma, n, device=x.device, dtype=torch.float64, who="DiffusersDenoiser")
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        dtype = next(self.model.parameters()).dtype
        x_in = (x.to(torch.float64) / (1 + s**2).sqrt()).to(dtype)
        t = self.sigma_to_t(sigma).to(torch.float32)
        kwargs = {}
        cls = self.convert_labels(labels, n)
        if cls is not None:
            kwargs["class_labels"] = cls
        out = self.model(x_in, t, **kwargs)
        out = getattr(out, "sample", out[0] if isinstance(out, tuple) else out)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, :x.shape[1]]  # a learned variance
        out = out.to(torch.float64)
        x64 = x.to(torch.float64)
        if self.prediction_type == "epsilon":
            d = x64 - s * out
        elif self.prediction_type == "v_prediction":
            d = x64 / (1 + s**2) - s / (1 + s**2).sqrt() * out
        else:
            d = out
        return d.to(x.dtype)

    def get_sigmas(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """The EDM schedule of ``n`` steps over this model's noise range, then 0 (``sigmas`` for a sampler)."""
        from fastdiff.diffusion import edm_sigma_steps

        return edm_sigma_steps(n, self.sigma_min, self.sigma_max, rho, dtype=torch.float64)

