"""Fixtures for the trainer tests: tiny model folders, built once per session."""

from __future__ import annotations

import pytest
import torch
from visionft.testing.tiny import save_tiny_vlm


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    # CI shares 2 cores between jobs; tiny models gain nothing from more threads.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch)`` -> a saved tiny model folder for ``arch`` (built once per arch)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = save_tiny_vlm(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get
