"""Patch-layer tests run the kernels on the GPU when there is one, else through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so this conftest
sets it when no CUDA device is visible (the same rule as tests/kernels/conftest.py).
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
