"""Shared fixtures for the benchmark suite.

Run:  pytest benchmarks --benchmark-enable --benchmark-only --benchmark-group-by=group \
        --benchmark-json=bench.json && python benchmarks/report.py bench.json
Each benchmark sets ``benchmark.group`` (the case) and ``benchmark.extra_info["impl"]`` (fastdiff,
reference, ...), so report.py can put the implementations of one case side by side with ratios.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Benchmarks are skipped by default (pyproject sets --benchmark-disable); say so once.
    config.addinivalue_line("markers", "bench: a benchmark case")
