"""Helpers shared by the kernel files: block sizes, warps, interpret-mode detection."""

from __future__ import annotations

import functools
import os

import torch
import triton

#: Largest row a single-program row kernel handles (elements). Wider rows fall back to PyTorch.
MAX_FUSED_SIZE = 65536


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel that holds one row of ``n_cols`` in one program."""
    block = triton.next_power_of_2(n_cols)
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 on CPU, where the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
