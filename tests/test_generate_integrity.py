"""``fastdiff generate`` hardening: non-finite samples are named and fail the run (no black PNGs passed off as
results), orphan temporaries of a killed run are removed, and bad ``--S-*`` values are clear errors."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch

from fastdiff._atomic import is_orphan_temp
from fastdiff.cli import generate as gen_cli
from fastdiff.sampling.samplers import check_churn_options
from fastdiff.sampling.generate import generate_images


class ElementwiseNet(torch.nn.Module):
    """A denoiser that diverges (NaN) for the samples whose initial noise has its first pixel above
    ``nan_above``; per sample, so which seeds diverge does not depend on the batch. NaN then propagates."""

    def __init__(self, nan_above=float("inf")):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 8, 1, 0
        self.nan_above = nan_above

    def forward(self, x, sigma, class_labels=None):
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        out = 0.5 * torch.tanh(x.float()) * (0.25 / (s**2 + 0.25)) + x.float() * (s**2 / (s**2 + 0.25))
        first = s.flatten() >= 79.0  # the first step, at sigma_max = 80: x is the scaled initial noise
        marked = first & ((x.reshape(len(x), -1)[:, 0] / s.flatten()) > self.nan_above)
        return torch.where(marked[:, None, None, None], torch.full_like(out, float("nan")), out)


def _args(**kw):
    p = argparse.ArgumentParser()
    gen_cli.add_arguments(p)
    argv = ["--net", "unused"] + [f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k}" for k, v in kw.items()]
    return p.parse_args(argv + ["--no-progress"])


def _bad_seeds(seeds, threshold):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [s for s, g in zip(seeds, gens) if float(torch.randn((1, 8, 8), generator=g)[0, 0, 0]) > threshold]


def test_nonfinite_samples_are_named_not_written_and_fail_the_run(tmp_path, capsys):
    seeds = list(range(12))
    expected = _bad_seeds(seeds, 0.8)
    assert 0 < len(expected) < len(seeds)
    out = tmp_path / "out"
    args = _args(seeds="0-11", outdir=str(out), grid=str(tmp_path / "grid.png"), batch=12, steps=2, device="cpu")
    assert gen_cli.run(gen_cli.parse_config(args), ElementwiseNet(0.8)) == 1
    err = capsys.readouterr().err
    assert f"{len(expected)} of 12 samples are not finite" in err
    assert "seeds " + ", ".join(map(str, expected)) in err and "PNGs were not written" in err
    assert sorted(os.listdir(out)) == [f"{s:06d}.png" for s in seeds if s not in expected]
    assert (tmp_path / "grid.png").exists()
    # The library names them too (a warning by default, or a callback).
    got = []
    for _ in generate_images(ElementwiseNet(0.8), seeds, steps=2, batch=5, on_nonfinite=got.extend):
        pass
    assert got == expected
    with pytest.warns(RuntimeWarning, match=f"seeds {expected[0]}"):
        list(generate_images(ElementwiseNet(0.8), seeds, steps=2))
    # A healthy network: exit status 0, every PNG.
    ok = gen_cli.parse_config(_args(seeds="0-3", outdir=str(tmp_path / "ok"), steps=2, device="cpu"))
    assert gen_cli.run(ok, ElementwiseNet()) == 0
    assert len(os.listdir(tmp_path / "ok")) == 4


def test_orphan_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "000000").mkdir(parents=True)
    # The names the PNG writer's temporaries have (fastdiff._atomic), as a SIGKILL leaves them.
    orphans = [out / ".000003.png.~fdtmp-k2j4h1ab.tmp", out / "000000" / ".000007.png.~fdtmp-zz_9q0xx.tmp"]
    for p in orphans:
        assert is_orphan_temp(p.name)
        p.write_bytes(b"half a png")
    keep = out / "notes.png.tmp1234"  # not our pattern: left alone
    keep.write_text("x")
    args = _args(seeds="0-1", outdir=str(out), subdirs=True, steps=2, device="cpu")
    assert gen_cli.run(gen_cli.parse_config(args), ElementwiseNet()) == 0
    assert not any(p.exists() for p in orphans) and keep.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    names = [n for _, _, files in os.walk(out) for n in files]
    assert sorted(n for n in names if n.endswith(".png")) == ["000000.png", "000001.png"]
    assert not [n for n in names if is_orphan_temp(n)]


@pytest.mark.parametrize("flag,value,message", [
    ("S_churn", -1, "--S-churn must be a finite number >= 0"), ("S_churn", math.nan, "--S-churn"),
    ("S_churn", math.inf, "--S-churn"), ("S_noise", -0.5, "--S-noise"), ("S_noise", math.nan, "--S-noise"),
    ("S_min", -0.1, "--S-min"), ("S_min", math.inf, "--S-min"), ("S_max", math.nan, "--S-max"),
    ("S_max", -2, "--S-max must be a number >= 0, or inf"),
])
def test_bad_churn_options_are_clear_errors(tmp_path, capsys, flag, value, message):
    assert gen_cli.main(_args(outdir=str(tmp_path), **{flag: value})) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(ValueError, match=flag):
        check_churn_options(**{flag: value})
    with pytest.raises(ValueError, match=flag):
        next(generate_images(ElementwiseNet(), [0], steps=2, **{flag: value}))


def test_churn_option_bounds():
    check_churn_options(0, 0, math.inf, 1)
    check_churn_options(40, 0.05, 50, 1.003)
    with pytest.raises(ValueError, match="S_min .* > S_max"):
        check_churn_options(10, 5, 1, 1)
