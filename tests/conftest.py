"""Shared test fixtures. No test module may change process-wide state at import: what a module needs
(one thread, say) it asks for through a fixture, which restores the state afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test's torch work on one thread (restored afterwards): on a shared 2-core machine two
    threads under load are several times slower, and tiny tensors gain nothing from a second one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
