"""VAE stage benchmark: encode and decode throughput (images/s) of fastdiff.vae, batched, against one image at a
time (how the official dataset tool encodes: batch size 1).

The VAE is the Stable Diffusion VAE's architecture (fastdiff.vae.SD_VAE_CONFIG, randomly initialized: the
speed does not depend on the weights, and nothing is downloaded) at ``--resolution`` pixels (default 256, i.e.
32x32 latents; 512 is the img512 size and takes minutes per round on a CPU). Both rows run the same
``AutoencoderKL`` in float32; the rows are timed in turns (fastdiff.bench.timing), so a change of load on a
shared machine hits them alike.

    PYTHONPATH=. python benchmarks/bench_vae.py --resolution 256 --batch 4          # table
    PYTHONPATH=. pytest benchmarks/bench_vae.py --benchmark-enable                  # pytest-benchmark (tiny VAE)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastdiff.bench import device_info
from fastdiff.bench.timing import time_interleaved

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def setup(config=None, resolution=256, batch=4, device="cpu"):
    """(VAE with batch ``batch``, the same VAE one image at a time, uint8 images, latents)."""
    from diffusers import AutoencoderKL

    from fastdiff.vae import SD_VAE_CONFIG, VAE

    torch.manual_seed(0)
    cfg = {k: v for k, v in (config or SD_VAE_CONFIG).items() if not k.startswith("_")}
    model = AutoencoderKL(**cfg)
    batched, single = VAE(model, batch_size=batch, device=device), VAE(model, batch_size=1, device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    latents = batched.sample_latents(batched.encode(images), g)
    return batched, single, images, latents


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny VAE instead of the SD architecture")
    args = p.parse_args(argv)
    batched, single, images, latents = setup(TINY if args.tiny else None, args.resolution, args.batch, args.device)
    n = images.shape[0]
    fns = {
        "encode, one image at a time (official tool)": lambda: single.encode(images),
        f"encode, fastdiff.vae batch {n}": lambda: batched.encode(images),
        "decode, one latent at a time": lambda: single.decode(latents),
        f"decode, fastdiff.vae batch {n}": lambda: batched.decode(latents),
    }
    times = time_interleaved(fns, device_info(args.device), warmup=1, rounds=args.rounds, block_s=0)
    arch = "tiny test VAE" if args.tiny else "Stable Diffusion VAE architecture (random weights)"
    print(f"{arch}, {n} images of {args.resolution}x{args.resolution} -> latents {tuple(latents.shape[1:])}, "
          f"float32, device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"median of {args.rounds} rounds")
    print("| case | median s per round | images/s |")
    print("|---|---|---|")
    for name in fns:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {n / med:.2f} |")
    return 0


# --- pytest-benchmark (the tiny VAE, so that the suite's run-through stays fast) ------------------------------

try:
    import pytest

    @pytest.fixture(scope="module")
    def _vae():
        pytest.importorskip("diffusers")
        return setup(TINY, resolution=32, batch=4)

    @pytest.mark.parametrize("impl", ["single", "batched"])
    @pytest.mark.benchmark(group="vae-encode-tiny-32px")
    def test_encode(benchmark, _vae, impl):
        batched, single, images, _ = _vae
        benchmark.extra_info["impl"] = impl
        out = benchmark(lambda: (batched if impl == "batched" else single).encode(images))
        assert out.shape == (4, 8, 16, 16)

    @pytest.mark.parametrize("impl", ["single", "batched"])
    @pytest.mark.benchmark(group="vae-decode-tiny-32px")
    def test_decode(benchmark, _vae, impl):
        batched, single, _, latents = _vae
        benchmark.extra_info["impl"] = impl
        out = benchmark(lambda: (batched if impl == "batched" else single).decode(latents))
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
except ImportError:  # pragma: no cover - pytest is optional for the script
    pass


if __name__ == "__main__":
    raise SystemExit(main())
