"""fastdiff.sampling.cuda_graphed: the static-buffer plumbing (with an eager stand-in for graph capture, so it
runs everywhere), the fallbacks, and real CUDA graphs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from fastdiff.bench import Options
from fastdiff.bench.suites import build_net
from fastdiff.sampling import Autoguidance, GraphedDenoiser, Interval, cuda_graphed, sample


class EagerCapture:
    """Stands in for CUDA graph capture: replay reruns the captured function on the static inputs and
    writes into the one output buffer, as a graph replay does."""

    def usable(self, x):
        return True

    def capture(self, fn):
        out = fn()

        def replay():
            out.copy_(fn())

        return replay, out


def _net(seed=0, **kw):
    """tiny-16 with every learned gain at 1, so every branch does real work."""
    return build_net("tiny-16", Options(), seed, **kw).eval().requires_grad_(False)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g))
    labels = torch.nn.functional.one_hot(torch.randint(0, 10, (n,), generator=g), 10).float()
    return x, sigma, labels


def test_static_buffers_carry_every_call():
    net = _net()
    gd = GraphedDenoiser(net, capture=EagerCapture())
    with torch.no_grad():
        for seed in range(3):  # new inputs each call: a stale static buffer would give the first call's output
            x, sigma, labels = _inputs(3, seed)
            assert torch.allclose(gd(x, sigma, labels), net(x, sigma, labels), atol=1e-6)
        x, sigma, labels = _inputs(3, 5)
        assert torch.allclose(gd(x, float(sigma[0]), labels), net(x, float(sigma[0]), labels), atol=1e-6)
    assert gd.captures == 1  # a scalar sigma is expanded to [N]: the same signature, the same graph
    assert gd.label_dim == net.label_dim and "class_labels" in str(__import__("inspect").signature(gd))


def test_new_signature_or_new_weights_capture_again():
    net = _net()
    gd = GraphedDenoiser(net, capture=EagerCapture(), max_graphs=2)
    with torch.no_grad():
        gd(*_inputs(2))
        gd(*_inputs(2, 1))
        assert gd.captures == 1
        gd(*_inputs(4))
        assert gd.captures == 2
        net.unet.out_gain.add_(0.5)  # weights changed in place: the old graph would use the old weights
        x, sigma, labels = _inputs(2, 2)
        assert torch.allclose(gd(x, sigma, labels), net(x, sigma, labels), atol=1e-6)
        assert gd.captures == 3 and len(gd._graphs) == 2  # least recently used dropped


def test_fallbacks_call_the_network_directly():
    net = _net()
    gd = cuda_graphed(net)  # the real CUDA capture: on CPU tensors it must not try
    x, sigma, labels = _inputs(2)
    with torch.no_grad():
        assert torch.equal(gd(x, sigma, labels), net(x, sigma, labels))
    eager = GraphedDenoiser(net, capture=EagerCapture())
    with torch.no_grad():
        eager(x, sigma, labels.argmax(1))  # integer labels are range-checked on the host
        eager(x, sigma, labels, force_fp32=True)  # keyword arguments
    assert gd.captures == 0 and eager.captures == 0
    net.requires_grad_(True)
    eager(x, sigma, labels)  # autograd with trainable weights
    assert eager.captures == 0
    assert cuda_graphed(gd) is gd
    with pytest.raises(ValueError, match="max_graphs"):
        cuda_graphed(net, max_graphs=0)


def test_sampling_with_graphed_networks_equals_eager():
    net, gnet = _net(0), _net(1, model_channels=16, logvar_channels=16)
    noise, _, labels = _inputs(2, 3)
    guidance = lambda a, b: Interval(Autoguidance(2.0, b), sigma=(0.28, 2.9))  # noqa: E731
    with torch.no_grad():
        want = sample(net, noise, "heun", steps=6, guidance=guidance(net, gnet), labels=labels)
        gn = GraphedDenoiser(net, capture=EagerCapture())
        gg = GraphedDenoiser(gnet, capture=EagerCapture())
        got = sample(gn, noise, "heun", steps=6, guidance=guidance(gn, gg), labels=labels)
    assert torch.allclose(got, want, atol=1e-5)
    assert gn.captures >= 1 and gg.captures >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_graphs_match_eager():
    net, gnet = _net(0).cuda(), _net(1, model_channels=16, logvar_channels=16).cuda()
    noise, _, labels = (t.cuda() for t in _inputs(4, 3))
    guidance = lambda a, b: Interval(Autoguidance(2.0, b), sigma=(0.28, 2.9))  # noqa: E731
    with torch.no_grad():
        want = sample(net, noise, "heun", steps=8, guidance=guidance(net, gnet), labels=labels)
        gn, gg = cuda_graphed(net), cuda_graphed(gnet)
        got = sample(gn, noise, "heun", steps=8, guidance=guidance(gn, gg), labels=labels)
        again = sample(gn, noise, "heun", steps=8, guidance=guidance(gn, gg), labels=labels)
    assert gn.captures >= 1 and gg.captures >= 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got, again)  # replays are deterministic and reuse the graphs


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: counts replays (the output stays what the capture computed)."""

    made: list = []

    def __init__(self):
        self.replays = 0
        _FakeGraph.made.append(self)

    def replay(self):
        self.replays += 1


class _FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def mocked_cuda_graphs(monkeypatch):
    """The real capture code (_CudaCapture) on CPU tensors, with CUDA's streams and graphs mocked."""
    import contextlib

    from fastdiff.sampling import graphs

    _FakeGraph.made = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(graphs._CudaCapture, "usable", lambda self, x: True)
    return _FakeGraph.made


def _cached(net):
    from fastdiff.nn.layers import MPConv

    return [t for m in net.modules() if isinstance(m, MPConv) for t in m.cached_tensors()]


def _holds(held, tensors):
    ids = {id(t) for t in held}
    return all(id(t) in ids for t in tensors)


def test_graphs_hold_what_they_read(mocked_cuda_graphs):
    """A graph holds the parameters, buffers and cached effective weights its capture read; an eager call
    in another dtype replaces the layers' caches but not what the graph holds (it replays, no new
    capture); an in-place weight update is a new capture."""
    import gc
    import weakref

    made = mocked_cuda_graphs
    net = _net()
    gd = cuda_graphed(net)
    x, sigma, labels = _inputs(2)
    with torch.no_grad():
        gd(x, sigma, labels)
        assert gd.captures == 1 and len(made) == 1 and made[0].replays == 1
        [held] = gd.held()
        cached = _cached(net)
        assert cached and _holds(held, cached) and _holds(held, list(net.parameters()) + list(net.buffers()))
        refs = [weakref.ref(t) for t in cached]
        del cached
        net.dtype = torch.bfloat16  # an eager call in another dtype: the effective weights now bfloat16
        net(x, sigma, labels)
        net.dtype = None
        now = {id(t) for t in _cached(net)}
        assert sum(id(r()) not in now for r in refs) >= 10  # the layers let go of the float32 ones...
        gc.collect()
        assert all(r() is not None for r in refs)  # ...the graph did not: a replay reads live memory
        gd(x, sigma, labels)
        assert gd.captures == 1 and made[0].replays == 2 and gd.held() == [held]
        net.unet.out_gain.add_(0.5)  # weights changed in place: captured anew, with the weights it now reads
        gd(x, sigma, labels)
        assert gd.captures == 2 and len(gd.held()) == 2 and _holds(gd.held()[-1], _cached(net))


def test_clear_weight_caches_drops_the_graphs(mocked_cuda_graphs):
    """clear_weight_caches frees the cached weights: the graphs holding them are dropped at the next
    call, which captures anew; a replaced parameter is a new signature, and the old graph keeps the old
    tensor alive (its id cannot be reused by another tensor while a graph may replay it)."""
    import gc
    import weakref

    from fastdiff.nn import clear_weight_caches

    net = _net()
    gd = cuda_graphed(net)
    x, sigma, labels = _inputs(2)
    with torch.no_grad():
        gd(x, sigma, labels)
        refs = [weakref.ref(t) for t in _cached(net)]
        clear_weight_caches(net)
        gc.collect()
        assert all(r() is not None for r in refs)  # held until the next call
        gd(x, sigma, labels)
        gc.collect()
        assert gd.captures == 2 and len(gd.held()) == 1 and all(r() is None for r in refs)
        old = net.unet.out_gain
        net.unet.out_gain = torch.nn.Parameter(old.detach().clone() + 0.25, requires_grad=False)
        gd(x, sigma, labels)
        assert gd.captures == 3 and any(t is old for t in gd.held()[0])
        storage = net.unet.out_gain.data_ptr()
        net.unet.out_gain.data = net.unet.out_gain.data.clone()  # new storage, same id and version (as .to() does)
        gd(x, sigma, labels)
        assert gd.captures == 4 and any(t.data_ptr() == storage for t in gd.held()[-2])
        gd.reset()
        assert gd.held() == []
