"""Shared pytest wiring: fixtures for the real components live in tests/harness and are loaded here.

Without a CUDA device, Triton kernels run through Triton's interpreter. ``TRITON_INTERPRET`` must be set
before any ``@triton.jit`` function is defined, and any test module may import the kernels (the trainer's
run path applies the patch layer), so it is set here, before collection.
"""

from __future__ import annotations

import os
import shutil


def _has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = [
    # Before the plugins that import them: a plugin module imported first would not be assert-rewritten.
    "tests.harness.kube_fixtures",
    "tests.harness.s3_fixtures",
    "tests.harness.mlflow_fixtures",
    "tests.harness.node_fixtures",
]
