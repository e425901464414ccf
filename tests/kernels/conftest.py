"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so this conftest
(loaded before the test modules, which import the kernels) sets it when no CUDA device is visible.
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
