"""fastdiff.interop: NumPy / CuPy / DLPack arrays through the functional API, zero-copy where possible."""

import sys
import types

import numpy as np
import pytest
import torch

from fastdiff import interop, ops
from fastdiff.sampling.guidance import Guided


def ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def spy():
    """A wrapped function that records the tensors it receives and returns a fresh tensor."""
    seen = {}

    @interop.wrap
    def fn(x, y=None):
        seen["x"], seen["y"] = x, y
        seen["out"] = x * 2
        return seen["out"], x

    return fn, seen


def rng_array(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_numpy_inputs_are_zero_copy_and_outputs_too():
    fn, seen = spy()
    a = rng_array(4, 5)
    out, same = fn(a, y=np.ones(3))
    assert isinstance(seen["x"], torch.Tensor) and seen["x"].data_ptr() == ptr(a)  # input: shared memory
    assert isinstance(seen["y"], torch.Tensor)
    assert isinstance(out, np.ndarray) and ptr(out) == seen["out"].data_ptr()  # output: shared memory
    assert np.shares_memory(same, a)  # a tensor viewing the input comes back as a view of the input
    np.testing.assert_array_equal(out, 2 * a)
    ro = a.copy()
    ro.flags.writeable = False
    fn(ro)
    assert seen["x"].data_ptr() == ptr(ro)  # read-only arrays are viewed too (the op only reads)


def test_arrays_torch_cannot_view_are_copied_correctly():
    fn, seen = spy()
    a = rng_array(6, 4)
    rev = a[::-1]  # negative strides
    out, _ = fn(rev)
    np.testing.assert_array_equal(out, 2 * rev)
    big_endian = a.astype(">f4")
    out, _ = fn(big_endian)
    np.testing.assert_allclose(out, 2 * a)
    strided = a[:, ::2]  # positive non-contiguous strides: still a view
    fn(strided)
    assert seen["x"].data_ptr() == ptr(strided) and not seen["x"].is_contiguous()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_accept_numpy_and_match_torch(dtype):
    x, y = rng_array(3, 8, dtype=dtype, seed=1), rng_array(3, 8, dtype=dtype, seed=2)
    w = rng_array(5, 8, dtype=dtype, seed=3)
    img = rng_array(2, 4, 3, 3, dtype=dtype, seed=4)
    tx, ty, tw, timg = (torch.from_numpy(v.copy()) for v in (x, y, w, img))
    cases = [
        (interop.ops.mp_silu(x), ops.mp_silu(tx)),
        (interop.ops.mp_sum(x, y, 0.3), ops.mp_sum(tx, ty, 0.3)),
        (interop.ops.mp_cat(x, y, t=0.4), ops.mp_cat(tx, ty, t=0.4)),
        (interop.ops.mp_linear(x, w, 0.7), ops.mp_linear(tx, tw, 0.7)),
        (interop.ops.weight_norm(w), ops.weight_norm(tw)),
        (interop.ops.pixel_norm(img), ops.pixel_norm(timg)),
        (interop.ops.clip(100 * x, 3.0), ops.clip(100 * tx, 3.0)),
        (interop.ops.mp_weight(w, gain=2.0), ops.mp_weight(tw, gain=2.0)),
    ]
    for got, want in cases:
        assert isinstance(got, np.ndarray) and got.dtype == want.numpy().dtype
        np.testing.assert_array_equal(got, want.numpy())


def test_in_place_op_updates_the_callers_array():
    w = rng_array(4, 6, seed=5) * 3
    expected = ops.weight_norm(torch.from_numpy(w.copy())).numpy()
    out = interop.ops.weight_norm_(w)
    assert isinstance(out, np.ndarray) and np.shares_memory(out, w)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-6)


def test_solver_step_with_numpy_batches():
    n = 4
    x, d1, d0 = (rng_array(n, 2, 3, 3, seed=s) for s in (6, 7, 8))
    w = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
    s_cur, s_next = np.full(n, 2.0, np.float32), np.array([1.0, 1.5, 0.5, 0.0], np.float32)
    with torch.no_grad():
        want = ops.solver_step(*(torch.from_numpy(v) for v in (x, d1, d0, w, s_cur, s_next)))
    got = interop.ops.solver_step(x, d1, d0, w, s_cur, s_next)
    assert isinstance(got, tuple) and len(got) == 3
    for g, t in zip(got, want):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, t.numpy())
    # Heun correction, numbers for the noise levels
    x_next, d, _ = got
    got2 = interop.ops.solver_step(x_next, d1, None, 1.0, 2.0, 1.0, d, x)
    want2 = ops.solver_step_reference(*(torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                         for v in (x_next, d1, None, 1.0, 2.0, 1.0, d, x)))
    for g, t in zip(got2, want2):
        np.testing.assert_allclose(g, t.numpy(), rtol=1e-6, atol=1e-6)


def test_guidance_combinations():
    du, dc = rng_array(3, 4, seed=9), rng_array(3, 4, seed=10)
    np.testing.assert_allclose(interop.cfg_combine(du, dc, 2.5), du + 2.5 * (dc - du), rtol=1e-6, atol=1e-6)
    w = np.array([1.0, 2.0, 4.0], np.float32)
    np.testing.assert_allclose(interop.autoguidance_combine(du, dc, w), du + w[:, None] * (dc - du),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(interop.cfg_combine(du, dc, 1.0), dc)
    t = interop.cfg_combine(torch.from_numpy(du), torch.from_numpy(dc), 2.5)
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, Guided(torch.from_numpy(dc), torch.from_numpy(du), 2.5).combine())


def test_frechet_distance_accepts_numpy():
    feats1, feats2 = rng_array(200, 3, dtype=np.float64, seed=11), rng_array(200, 3, dtype=np.float64, seed=12) + 0.5
    mu1, mu2 = feats1.mean(0), feats2.mean(0)
    s1, s2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    fd = interop.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(fd, float)
    from fastdiff.metrics import frechet_distance

    assert fd == frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2),
                                  torch.from_numpy(s2))
    assert 0.6 < fd < 0.9  # ~ ||0.5 * ones(3)||^2 = 0.75


def test_torch_path_is_untouched():
    t = torch.randn(3, 4)
    fn, seen = spy()
    out, same = fn(t)
    assert same is t and isinstance(out, torch.Tensor)
    torch.testing.assert_close(interop.ops.mp_silu(t), ops.mp_silu(t))
    p = torch.nn.Parameter(torch.randn(5, 4))
    y = interop.ops.mp_linear(t, p, 1.0)
    y.sum().backward()  # autograd flows through the wrapped op as through the original
    assert p.grad is not None
    assert interop.wrap(fn) is fn  # wrapping twice is a no-op


def test_mixed_inputs_and_output_kinds():
    a = rng_array(2, 3)
    t = torch.ones(2, 3)
    out = interop.ops.mp_sum(a, t, 0.5)  # numpy + torch: numpy decides the output kind
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, 0.5 * (a + 1) / np.sqrt(0.5), rtol=1e-6)
    bf = interop.wrap(lambda x: torch.from_numpy(x.numpy()).to(torch.bfloat16) if isinstance(x, torch.Tensor) else x)
    res = bf(a)
    assert isinstance(res, np.ndarray) and res.dtype == np.float32  # NumPy has no bfloat16

    @interop.wrap
    def many(x):
        return {"a": x, "b": [x + 1, None], "c": 3.0}

    res = many(a)
    assert isinstance(res["a"], np.ndarray) and isinstance(res["b"][0], np.ndarray) and res["c"] == 3.0
    res = interop.wrap(lambda xs: [x * 2 for x in xs])([a, a])
    assert all(isinstance(r, np.ndarray) for r in res)


def test_generic_dlpack_producer_round_trip():
    """Any object with __dlpack__ goes in via torch.from_dlpack and comes back through its package's
    from_dlpack (a stand-in package here)."""
    fake = types.ModuleType("fakearrays")

    class FakeArray:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kwargs):
            return self.t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    FakeArray.__module__ = "fakearrays"
    fake.FakeArray = FakeArray
    fake.from_dlpack = lambda obj: FakeArray(torch.from_dlpack(obj))
    sys.modules["fakearrays"] = fake
    try:
        base = torch.randn(3, 4)
        arr = FakeArray(base)
        assert interop.array_kind(arr) == "dlpack:fakearrays"
        fn, seen = spy()
        out, _ = fn(arr)
        assert seen["x"].data_ptr() == base.data_ptr()  # zero-copy in
        assert isinstance(out, FakeArray) and out.t.data_ptr() == seen["out"].data_ptr()  # zero-copy out
        res = interop.ops.mp_silu(arr)
        torch.testing.assert_close(res.t, ops.mp_silu(base))
        with pytest.raises(TypeError, match="mixed"):
            interop.ops.mp_sum(arr, rng_array(3, 4), 0.5)
    finally:
        del sys.modules["fakearrays"]


def test_ops_mirror():
    for name in ops.__all__:
        assert hasattr(interop.ops, name), name
    assert interop.ops.HAS_EXTENSION == ops.HAS_EXTENSION
    assert interop.ops.reference is ops.reference
    assert interop.ops.use_reference is ops.use_reference
    with interop.ops.use_reference():
        out = interop.ops.mp_silu(rng_array(2, 2))
    assert isinstance(out, np.ndarray)


# --- CuPy (skipped without cupy or a GPU) ---------------------------------------------------------


@pytest.fixture
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:  # noqa: BLE001  (no driver, no device)
        pytest.skip(f"no usable CUDA device for CuPy: {e}")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return cp


def test_cupy_zero_copy_round_trip(cupy):
    a = cupy.asarray(rng_array(4, 8))
    fn, seen = spy()
    out, same = fn(a)
    assert seen["x"].is_cuda and seen["x"].data_ptr() == a.data.ptr
    assert isinstance(out, cupy.ndarray) and out.data.ptr == seen["out"].data_ptr()
    assert same.data.ptr == a.data.ptr


def test_cupy_ops_match_torch(cupy):
    x, y = cupy.asarray(rng_array(3, 16, seed=1)), cupy.asarray(rng_array(3, 16, seed=2))
    got = interop.ops.mp_sum(interop.ops.mp_silu(x), y, 0.3)
    want = ops.mp_sum(ops.mp_silu(torch.from_dlpack(x)), torch.from_dlpack(y), 0.3)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), want.cpu().numpy(), rtol=1e-6, atol=1e-6)
    d = interop.cfg_combine(x, y, cupy.asarray(np.array([1.0, 2.0, 3.0], np.float32)))
    assert isinstance(d, cupy.ndarray)
    with pytest.raises(TypeError, match="mixed"):
        interop.ops.mp_sum(x, rng_array(3, 16), 0.5)
