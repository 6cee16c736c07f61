"""fastdiff.diffusers: fastdiff networks as diffusers models and pipelines, diffusers models as fastdiff
denoisers. Tiny random models built here; ``from_pretrained`` from local folders only (no hub access)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (a test extra)")

from conftest import tiny_net
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)

from fastdiff.diffusers import DiffusersDenoiser, EDM2Pipeline, EDM2UNetModel
from fastdiff.sampling import (
    APG,
    CFG,
    Autoguidance,
    Interval,
    sample,
    sample_dpmpp_2m,
    sample_euler,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    return tiny_net(seed=0).eval()


def _noise(n=2, seed=0, shape=(3, 16, 16)):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


# --- EDM2UNetModel --------------------------------------------------------------------------------------------


def test_edm2_unet_model_is_the_network_under_the_edm_schedulers_preconditioning(net):
    model = EDM2UNetModel.from_fastdiff(net)
    assert model.to_fastdiff() is net and model.config.label_dim == 10 and model.config.img_resolution == 16
    sched = EDMEulerScheduler()
    sched.set_timesteps(6)
    x = _noise() * 3.0
    labels = torch.tensor([2, 5])
    with torch.no_grad():
        for i in (0, 3):
            t, sigma = sched.timesteps[i], sched.sigmas[i]
            sched._step_index = None  # scale_model_input reads the step index from the timestep when unset
            out = model(sched.scale_model_input(x, t), t, labels).sample
            d = sched.precondition_outputs(x, out, sigma)
            want = net(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
            assert torch.allclose(d, want, rtol=1e-5, atol=1e-5)
        # one-hot labels and class indices are the same condition; timesteps per sample too
        t = sched.timesteps[2]
        a = model(x, t, labels).sample
        b = model(x, t.expand(2), torch.nn.functional.one_hot(labels, 10).float()).sample
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one value or one per sample"):
        model(x, torch.zeros(3), labels)
    with pytest.raises(TypeError, match="expects a fastdiff.nn.Precond"):
        EDM2UNetModel.from_fastdiff(torch.nn.Linear(2, 2))


def test_edm2_unet_model_save_and_load_round_trip_bit_identically(net, tmp_path):
    model = EDM2UNetModel.from_fastdiff(net)
    model.save_pretrained(tmp_path / "edm2")
    loaded = EDM2UNetModel.from_pretrained(tmp_path / "edm2")
    assert loaded.to_fastdiff().init_kwargs == net.init_kwargs
    mine, theirs = net.state_dict(), loaded.to_fastdiff().state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x, labels = _noise(), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(loaded.to_fastdiff()(x, 0.7, labels), net(x, 0.7, labels))
    # the U-Net's reduced precision is part of the config
    bf16 = EDM2UNetModel.from_fastdiff(tiny_net(dtype="bfloat16"))
    bf16.save_pretrained(tmp_path / "bf16")
    assert EDM2UNetModel.from_pretrained(tmp_path / "bf16").to_fastdiff().dtype == torch.bfloat16
    # a fresh model from the config alone has the same architecture
    fresh = EDM2UNetModel.from_config(EDM2UNetModel.load_config(tmp_path / "edm2"))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# --- EDM2Pipeline ---------------------------------------------------------------------------------------------


def test_pipeline_save_and_load_a_local_folder(net, tmp_path):
    pipe = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(net), scheduler=EDMEulerScheduler(sigma_max=40.0))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = EDM2Pipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.scheduler, EDMEulerScheduler) and loaded.scheduler.config.sigma_max == 40.0
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    run = lambda p: p(class_labels=[5], num_inference_steps=3, latents=_noise(1), output_type="latent").images
    assert torch.equal(run(pipe), run(loaded))
    # without a scheduler (fastdiff's samplers only)
    EDM2Pipeline(unet=loaded.unet).save_pretrained(tmp_path / "bare")
    assert EDM2Pipeline.from_pretrained(tmp_path / "bare").scheduler is None


def test_pipeline_with_edm_euler_scheduler_equals_fastdiffs_euler(net):
    sched = EDMEulerScheduler()
    pipe = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(net), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    noise = _noise()
    got = pipe(class_labels=[3, 8], num_inference_steps=6, latents=noise, output_type="latent").images
    sigmas = sched.sigmas  # set by the pipeline's run
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 8]), 10).float()
    with torch.no_grad():
        # the scheduler's start: noise * init_noise_sigma (sqrt(sigma_max^2 + 1) in diffusers' EDM schedulers)
        want = sample_euler(net, noise * sched.init_noise_sigma, sigmas, labels=onehot)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_pipeline_with_edm_dpmsolver_scheduler_and_fastdiff_samplers(net):
    unet = EDM2UNetModel.from_fastdiff(net)
    noise = _noise()
    labels = [4, 0]
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 10).float()
    sched = EDMDPMSolverMultistepScheduler()
    pipe = EDM2Pipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=labels, num_inference_steps=8, latents=noise, output_type="latent").images
    with torch.no_grad():  # the scheduler's DPM-Solver++(2M) is fastdiff's on its sigmas
        want = sample_dpmpp_2m(net, noise * sched.init_noise_sigma, sched.sigmas, labels=onehot)
    assert ((got - want).norm() / want.norm()).item() < 2e-5
    # any fastdiff sampler by name, instead of the scheduler: exactly fastdiff's own
    for name in ("heun", "dpmpp_2m"):
        got = pipe(class_labels=labels, num_inference_steps=5, latents=noise, sampler=name, output_type="pt").images
        with torch.no_grad():
            want = sample(net, noise, name, steps=5, labels=onehot)
        assert torch.allclose(got, (want / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_pipeline_guidance_generators_and_output_types(net):
    guide = tiny_net(seed=1, model_channels=16).eval()
    pipe = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(net), scheduler=EDMEulerScheduler())
    small = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(guide))
    pipe.set_progress_bar_config(disable=True)
    noise = _noise()
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    auto = Interval(inner=Autoguidance(guide=small.unet.to_fastdiff(), weight=2.0), sigma=(0.3, 5.0))
    for guidance in (auto, APG(weight=1.5), CFG(weight=2.0)):
        got = pipe(class_labels=[1, 2], num_inference_steps=5, latents=noise, guidance=guidance,
                   sampler="euler", output_type="latent").images
        with torch.no_grad():
            want = sample(net, noise, "euler", steps=5, labels=onehot, guidance=guidance)
        assert torch.equal(got, want)
    # a second pipeline's diffusers model as the guide is its fastdiff network (D, not the raw F)
    wrapped = Interval(inner=Autoguidance(guide=small.unet, weight=2.0), sigma=(0.3, 5.0))
    got = pipe(class_labels=[1, 2], num_inference_steps=5, latents=noise, guidance=wrapped, sampler="euler",
               output_type="latent").images
    with torch.no_grad():
        assert torch.equal(got, sample(net, noise, "euler", steps=5, labels=onehot, guidance=auto))
    assert wrapped.inner.guide is small.unet  # the caller's object is untouched
    # guidance with the scheduler: the scheduler's steps on the guided D
    with_sched = pipe(class_labels=[1, 2], num_inference_steps=5, latents=noise, guidance=auto,
                      output_type="latent").images
    with torch.no_grad():
        want = sample_euler(net, noise * pipe.scheduler.init_noise_sigma, pipe.scheduler.sigmas, labels=onehot,
                            guidance=auto)
    assert (with_sched - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # per-sample generators: a sample depends on its own generator only
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = pipe(class_labels=[1, 2], num_inference_steps=3, generator=gens([10, 11]), output_type="pt",
                sampler="euler_ancestral").images
    one = pipe(class_labels=[2], num_inference_steps=3, generator=gens([11]), output_type="pt",
               sampler="euler_ancestral").images
    other = pipe(class_labels=[2], num_inference_steps=3, generator=gens([12]), output_type="pt",
                 sampler="euler_ancestral").images
    # (the network's float32 rounding depends a little on the batch size)
    assert (both[1:] - one).abs().max().item() < 1e-4 < (other - one).abs().max().item()
    # output types
    pil = pipe(class_labels=[1, 2], num_inference_steps=2, generator=gens([0, 1])).images
    arr = pipe(class_labels=[1, 2], num_inference_steps=2, generator=gens([0, 1]), output_type="np").images
    assert len(pil) == 2 and pil[0].size == (16, 16) and arr.shape == (2, 16, 16, 3)
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="one per sample"):
        pipe(class_labels=[1, 2], generator=gens([0, 1, 2]))
    with pytest.raises(ValueError, match="S_churn: options of fastdiff's samplers.*EDMEulerScheduler"):
        pipe(class_labels=[1], S_churn=1.0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")


def test_pipeline_decodes_a_latent_network_with_its_vae(tmp_path):
    from diffusers import AutoencoderKL

    from fastdiff.vae import VAE

    latent_net = tiny_net(seed=3, img_channels=4).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=32).eval()
    pipe = EDM2Pipeline(unet=EDM2UNetModel.from_fastdiff(latent_net), scheduler=EDMEulerScheduler(), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    noise = _noise(shape=(4, 16, 16))
    latents = pipe(class_labels=[1, 2], num_inference_steps=3, latents=noise, output_type="latent").images
    images = pipe(class_labels=[1, 2], num_inference_steps=3, latents=noise, output_type="np").images
    want = VAE(vae).decode(latents)  # EDM2's VAE stage with EDM2's latent scaling
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal((images * 255).round().astype(np.uint8), want.permute(0, 2, 3, 1).numpy())
    pipe.save_pretrained(tmp_path / "latent")
    assert isinstance(EDM2Pipeline.from_pretrained(tmp_path / "latent").vae, AutoencoderKL)
    with pytest.raises(ValueError, match="4-channel latents: give the pipeline a vae"):
        EDM2Pipeline(unet=pipe.unet)(class_labels=[1], num_inference_steps=2)


# --- DiffusersDenoiser --------------------------------------------------------------------------------------------


def _unet(seed=0, num_class_embeds=None):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_class_embeds).eval()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fastdiff_euler_on_a_ddpm_unet_equals_diffusers_euler_discrete(prediction_type):
    unet = _unet()
    sched = EulerDiscreteScheduler.from_config(DDPMScheduler(prediction_type=prediction_type).config)
    sched.set_timesteps(8)
    noise = _noise(shape=(3, 8, 8))
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x).prev_sample
        den = DiffusersDenoiser(unet, sched)
        ours = sample_euler(den, noise * sched.sigmas[0], sched.sigmas)
    assert (ours - x).abs().max().item() <= 1e-5 * x.abs().max().item()
    # the timestep each noise level maps to is the scheduler's own
    assert torch.allclose(den.sigma_to_t(sched.sigmas[:-1].double()), sched.timesteps.double(), atol=2e-3)


def test_log_sigma_timesteps_with_karras_sigmas():
    unet = _unet(seed=2)
    sched = EulerDiscreteScheduler(use_karras_sigmas=True)
    sched.set_timesteps(6)
    noise = _noise(shape=(3, 8, 8))
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        den = DiffusersDenoiser(unet, sched)
        ours = sample_euler(den, noise * sched.sigmas[0], sched.sigmas)
    assert den.interpolation == "log"
    assert (ours - x).abs().max().item() <= 1e-5 * x.abs().max().item()


def test_guidance_on_diffusers_models():
    """Two-network autoguidance, the interval in sigma, CFG with the null class: each equal to its formula."""
    sched = DDPMScheduler()
    strong = DiffusersDenoiser(_unet(0, num_class_embeds=4), sched)
    weak = DiffusersDenoiser(_unet(1, num_class_embeds=4), sched)
    assert strong.label_dim == 4 and strong.img_resolution == 8 and strong.img_channels == 3
    sigmas = strong.get_sigmas(5)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3]), 4).float()
    x0 = _noise(shape=(3, 8, 8)) * sigmas[0]
    w, lo, hi = 2.5, 0.5, 20.0

    def manual(x, sigma, labels):
        d, g = strong(x, sigma, labels), weak(x, sigma, labels)
        inside = (sigma >= lo) & (sigma <= hi)
        return torch.where(inside.reshape(-1, 1, 1, 1), g + w * (d - g), d)

    with torch.no_grad():
        got = sample_euler(strong, x0, sigmas, labels=labels,
                           guidance=Interval(inner=Autoguidance(guide=weak, weight=w), sigma=(lo, hi)))
        want = sample_euler(manual, x0, sigmas, labels=labels)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="null_class"):
        strong(x0, sigmas[0], torch.zeros(2, 4))


def test_dit_class_conditional_with_its_null_class():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                norm_num_groups=4).eval()
    den = DiffusersDenoiser(dit, DDPMScheduler(prediction_type="epsilon"))
    assert den.null_class == 5 and den.label_dim == 5
    x = _noise(shape=(4, 8, 8)) * 2.0
    sigma = torch.tensor([2.0, 2.0])
    with torch.no_grad():
        cond = den(x, sigma, torch.nn.functional.one_hot(torch.tensor([1, 4]), 5).float())
        uncond = den(x, sigma, torch.zeros(2, 5))
        # by hand: the DiT's eps (first half of its channels) at the interpolated timestep, null class = 5
        t = den.sigma_to_t(sigma).float()
        x_in = x / (1 + 4.0) ** 0.5
        eps = dit(x_in, t, class_labels=torch.tensor([5, 5])).sample[:, :4]
        assert torch.allclose(uncond, x - 2.0 * eps, atol=1e-5)
        guided = CFG(weight=3.0)
        got = sample_euler(den, x, torch.tensor([2.0, 0.0]), labels=torch.eye(5)[[1, 4]], guidance=guided)
    assert torch.allclose(got, uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_diffusers_denoiser_errors():
    unet = _unet()
    with pytest.raises(ValueError, match="no alphas_cumprod"):
        DiffusersDenoiser(unet, EDMEulerScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(unet, DDPMScheduler(), prediction_type="flow")
    with pytest.raises(ValueError, match="timestep_interpolation"):
        DiffusersDenoiser(unet, DDPMScheduler(), timestep_interpolation="cubic")
