"""CUDA graphs for sampling: ``cuda_graphed(net)`` replays captured graphs of the network's forward.

A sampler calls the same network tens of times on inputs of one shape; at small batches the launch cost of
its kernels is a large share of the step. ``cuda_graphed(net)`` captures ``net(x, sigma, labels)`` once per
input signature and replays it, falling back to ``net`` itself where it cannot help (see :func:`cuda_graphed`)::

    x = sample(cuda_graphed(net), noise, guidance=Interval(Autoguidance(2.0, cuda_graphed(gnet)), sigma=(0.28, 2.9)))

Each graph owns what it reads (its static buffers, the parameters and the effective weights its capture read
from the layers' caches); a weight changed, replaced or moved is a new signature, captured anew.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable

import torch

from fastdiff.diffusion import sigma_per_sample
from fastdiff.nn.layers import weight_cache_clears

__all__ = ["cuda_graphed", "GraphedDenoiser"]


class _CudaCapture:
    """Captures ``fn()`` (reading static inputs) into a CUDA graph; ``replay()`` reruns it in place."""

    warmup = 2

    def usable(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def capture(self, fn: Callable[[], torch.Tensor]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture (lazy init, caches, cuBLAS workspaces)
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out


class _Graph:
    """One captured signature: the static buffers, the replay, and every tensor the capture read (held)."""

    __slots__ = ("static_x", "static_sigma", "static_labels", "replay", "out", "held")

    def __init__(self, static_x, static_sigma, static_labels, replay, out, held):
        self.static_x, self.static_sigma, self.static_labels = static_x, static_sigma, static_labels
        self.replay, self.out, self.held = replay, out, held


class GraphedDenoiser:
    """``net(x, sigma, labels)`` served from captured graphs; see :func:`cuda_graphed`."""

    def __init__(self, net: Callable, max_graphs: int = 8, capture=None):
        if max_graphs < 1:
            raise ValueError(f"cuda_graphed: max_graphs must be at least 1, got {max_graphs}")
        self.net = net
        self.max_graphs = int(max_graphs)
        self._capture = capture or _CudaCapture()
        self._graphs: OrderedDict = OrderedDict()
        self._clears = weight_cache_clears()  # the layers' cache clears the graphs have seen
        self.captures = 0  # how many graphs were captured (for tests and diagnostics)
        fn = net.forward if isinstance(net, torch.nn.Module) else net
        try:  # show the network's own signature
            self.__signature__ = inspect.signature(fn)
        except (TypeError, ValueError):
            pass

    def __getattr__(self, name):  # label_dim, img_resolution, ... of the wrapped network
        if name == "net" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.net, name)

    def __repr__(self) -> str:
        return f"cuda_graphed({self.net!r})"

    def _tensors(self) -> list[torch.Tensor]:
        if isinstance(self.net, torch.nn.Module):
            return list(self.net.parameters()) + list(self.net.buffers())
        return []

    def _eligible(self, x, sigma, labels, kwargs) -> bool:
        if kwargs or not isinstance(x, torch.Tensor) or not self._capture.usable(x):
            return False
        if labels is not None and not (isinstance(labels, torch.Tensor) and labels.is_floating_point()):
            return False  # integer class indices are range-checked on the host: not capturable
        if torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors()):
            return False
        return True

    def __call__(self, x, sigma, labels=None, **kwargs):
        if not self._eligible(x, sigma, labels, kwargs):
            return self.net(x, sigma, labels, **kwargs)
        n = x.shape[0]
        sigma = sigma_per_sample(sigma, n, device=x.device, image_shaped=True, who="GraphedDenoiser")
        tensors = self._tensors()
        key = (tuple(x.shape), x.dtype, x.device, x.stride(), sigma.dtype,
               None if labels is None else (tuple(labels.shape), labels.dtype),
               tuple(id(t) for t in tensors), tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))
        clears = weight_cache_clears()
        if clears != self._clears:  # cached weights were released: the graphs must not keep them alive
            self.reset()
            self._clears = clears
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new_graph(key, x, sigma, labels)
        else:
            self._graphs.move_to_end(key)
        entry.static_x.copy_(x)
        entry.static_sigma.copy_(sigma)
        if labels is not None:
            entry.static_labels.copy_(labels)
        entry.replay()
        return entry.out.clone()

    def _held(self) -> tuple[torch.Tensor, ...]:
        """What a capture of the network's forward reads beyond its inputs: parameters, buffers and the
        effective weights in the layers' caches (after the capture, the ones it used). Each parameter is held
        as itself (its id is part of the signature) and as a detached alias of its storage (which ``.to()`` or a
        ``.data`` assignment would otherwise free)."""
        held = self._tensors()
        held += [t.detach() for t in held]
        if isinstance(self.net, torch.nn.Module):
            for m in self.net.modules():
                cached = getattr(m, "cached_tensors", None)
                if callable(cached):
                    held.extend(cached())
        return tuple(held)

    def _new_graph(self, key, x, sigma, labels) -> _Graph:
        static_x = x.clone()
        static_sigma = sigma.clone()
        static_labels = None if labels is None else labels.clone()
        replay, out = self._capture.capture(lambda: self.net(static_x, static_sigma, static_labels))
        self.captures += 1
        entry = _Graph(static_x, static_sigma, static_labels, replay, out, self._held())
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def held(self) -> list[tuple[torch.Tensor, ...]]:
        """The tensors each captured graph holds (least recently used first), for tests and diagnostics."""
        return [g.held for g in self._graphs.values()]

    def reset(self) -> None:
        """Drop every captured graph (and its memory)."""
        self._graphs.clear()


def cuda_graphed(net: Callable, max_graphs: int = 8) -> GraphedDenoiser:
    """Wrap ``net`` (called as ``net(x, sigma, labels)``) so sampling replays captured CUDA graphs.

    A sampler calls the same network tens of times on inputs of one shape; each forward launches hundreds of
    small kernels, and at small batches the launch cost is a large share of the step. ``cuda_graphed(net)``
    captures ``net(x, sigma, labels)`` once per input signature (shapes, dtypes, device, and the version of every
    parameter and buffer, so changed weights are captured anew) into a CUDA graph with static input buffers,
    then serves each call by copying the inputs in, replaying the graph and returning a copy of the output.

    Falls back to calling ``net`` directly (same results) when it cannot help: CPU tensors, autograd enabled with
    parameters that need gradients, or extra keyword arguments; TSG calls the wrapped network itself, since its
    forward hook on the noise embedding must run in an eager forward. The network must
    not synchronize with the host inside its forward (fastdiff's networks do not, given float labels); at most
    ``max_graphs`` signatures are kept (least recently used dropped), each with its own memory pool.
    """
    if isinstance(net, GraphedDenoiser):
        return net
    return GraphedDenoiser(net, max_graphs=max_graphs)
