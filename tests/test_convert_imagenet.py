"""``fastdiff dataset convert --transform center-crop-dhariwal``: the ImageNet preparation EDM2 uses (ADM's
center crop: box-filter halving, bicubic resize of the short side, center crop)."""

from __future__ import annotations

import numpy as np
import pytest

from fastdiff.data import open_dataset
from fastdiff.data.convert import convert_dataset

Image = pytest.importorskip("PIL.Image")


def _expected(arr, res):
    """Re-derived: while the short side >= 2 * res, average 2x2 blocks (a box filter halving even sizes);
    then bicubic so the short side is res; then the centered res x res window."""
    while min(arr.shape[:2]) >= 2 * res:
        h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
        a = arr[:h, :w].astype(np.float64)
        arr = np.round((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4).astype(np.uint8)
    h, w = arr.shape[:2]
    s = res / min(h, w)
    img = Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
    out = np.asarray(img)
    y, x = (out.shape[0] - res) // 2, (out.shape[1] - res) // 2
    return out[y:y + res, x:x + res]


def test_center_crop_dhariwal(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src" / "n01"
    src.mkdir(parents=True)
    (tmp_path / "src" / "n02").mkdir()
    arrays = {"n01/a.png": rng.integers(0, 256, (200, 300, 3), dtype=np.uint8),   # landscape: halved once
              "n01/b.png": rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),     # portrait, upscaled
              "n02/c.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}     # already the size
    for name, arr in arrays.items():
        Image.fromarray(arr).save(tmp_path / "src" / name)
    assert convert_dataset(str(tmp_path / "src"), str(tmp_path / "out.zip"), resolution=32,
                           transform="center-crop-dhariwal", progress=False) == 3
    ds = open_dataset(str(tmp_path / "out.zip"))
    assert ds.resolution == 32 and ds.label_dim == 2
    for i, arr in enumerate(arrays.values()):
        got = ds[i][0].permute(1, 2, 0).numpy()
        diff = np.abs(got.astype(int) - _expected(arr, 32).astype(int))
        # Pillow's box filter rounds in its own fixed point (up to one level per halving); on noise another
        # pipeline differs by several levels on average (checked below).
        assert diff.max() <= 4 and diff.mean() < 1.5, (i, diff.max(), diff.mean())
    convert_dataset(str(tmp_path / "src"), str(tmp_path / "plain.zip"), resolution=32, transform="center-crop",
                    progress=False)
    plain = open_dataset(str(tmp_path / "plain.zip"))[0][0].permute(1, 2, 0).numpy()
    assert np.abs(plain.astype(int) - _expected(arrays["n01/a.png"], 32).astype(int)).mean() > 2.5
