"""Shared test fixtures. No test module may change process-wide state at import: what a module needs
(one thread, say) it asks for through a fixture, which restores the state afterwards."""

from __future__ import annotations

import os

import pytest
import torch

# FASTDIFF_REQUIRE_CUDA=1 (tools/gpu_session.sh sets it): a GPU run where a skipped CUDA test would hide a
# broken build. The session refuses to start without a CUDA device and the fastdiff CUDA kernels, and any
# test that skips for want of CUDA / a GPU / the extension fails instead.
REQUIRE_CUDA = os.environ.get("FASTDIFF_REQUIRE_CUDA", "0") not in ("", "0")
_CUDA_SKIP_WORDS = ("cuda", "gpu", "extension", "fastdiff._c")
_CUDA_SKIP_EXEMPT = ("two gpus", "several gpus", "multi-gpu")  # a one-GPU machine may skip these


def pytest_sessionstart(session):
    if not REQUIRE_CUDA:
        return
    if not torch.cuda.is_available():
        raise pytest.UsageError("FASTDIFF_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    from fastdiff.ops import _ext

    if not (_ext.LOADED and _ext.has_kernel("mp_silu", "cuda")):
        raise pytest.UsageError(f"FASTDIFF_REQUIRE_CUDA=1 but fastdiff._C has no CUDA kernels (load error: {_ext.LOAD_ERROR})")


def cuda_skip_is_failure(reason: str) -> bool:
    """Whether a skip with this reason must fail the run under FASTDIFF_REQUIRE_CUDA=1."""
    reason = reason.lower()
    return REQUIRE_CUDA and any(w in reason for w in _CUDA_SKIP_WORDS) and not any(w in reason for w in _CUDA_SKIP_EXEMPT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and cuda_skip_is_failure(str(report.longrepr[2])):
        report.outcome = "failed"
        report.longrepr = f"FASTDIFF_REQUIRE_CUDA=1: skipped for want of CUDA: {report.longrepr[2]}"


@pytest.fixture
def one_thread():
    """Run a test's torch work on one thread (restored afterwards): on a shared 2-core machine two
    threads under load are several times slower, and tiny tensors gain nothing from a second one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- shared helpers (test modules import them: ``from conftest import tiny_net, rel_err, run_cli``) ---------------


def randomize_gains(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised learned gains (the 0-d parameters) values in [0.5, 2.5), so every path of the
    network carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([], generator=g) * 2 + 0.5)
    return module


def tiny_net(seed: int = 0, preset: str = "tiny-16", **overrides) -> torch.nn.Module:
    """A small EDM2 network (``fastdiff.nn.build(preset, **overrides)``, weights from ``seed``) with non-zero
    gains."""
    import fastdiff.nn as fnn

    torch.manual_seed(seed)
    return randomize_gains(fnn.build(preset, **overrides), seed)


def on_threads(threads: int, fn, *args):
    """``fn(*args)`` with torch on ``threads`` threads (the previous count restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(old)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (Frobenius norms, in float64)."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` (in float64): the worst element against the tensor's scale."""
    scale = max(want.double().abs().max().item(), 1e-30)
    return (got.double() - want.double()).abs().max().item() / scale


def rnd(*shape, dtype=torch.float64, seed=0, scale=1.0) -> torch.Tensor:
    """Standard normal values of ``shape`` from the generator seeded with ``seed`` (drawn in float64, then
    cast to ``dtype``, so every dtype sees the same numbers), times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def cli_args(module, *argv):
    """The parsed arguments of a ``fastdiff.cli`` command module for ``argv`` (items turned into strings)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"fastdiff {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run_cli(module, *argv) -> int:
    """Run a ``fastdiff.cli`` command module as ``fastdiff <command> argv...`` would (its ``main``)."""
    return module.main(cli_args(module, *argv))
