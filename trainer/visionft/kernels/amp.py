"""Running this package's autograd Functions under ``torch.autocast``.

Autocast recasts the inputs of the ops it knows (matmuls to the autocast dtype) but not in-place
ops or ``out=`` writes, so a Function that mixes the two (``addmm_``, ``mm(out=)``) would meet
operands of two dtypes when the model's weights are fp32 and autocast is on (the Trainer's
``bf16=True`` on a CPU). Such a Function instead runs like an autocast-aware op: its floating
inputs cast to the autocast dtype, autocast off inside.
"""

from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


__all__ = ["autocast_dtype"]
