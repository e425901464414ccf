"""Shared by the patching tests (GPU runs use ``--noconftest``; these only pin CPU threads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One CPU thread per test module (restored after), as the tiny models' ops are too small to split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
