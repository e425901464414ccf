"""The bookkeeping every patch goes through: the record of what was swapped (so ``revert`` undoes exactly
that), the device and version checks, and the one log line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from visionft.kernels._utils import interpret_mode

logger = logging.getLogger(__name__)

#: transformers releases whose module layouts the patches were written and tested against.
TRANSFORMERS_SUPPORTED = ((5, 17), (5, 23))

_MISSING = object()


def kernels_can_run(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1``."""
    return device.type == "cuda" or (device.type == "cpu" and interpret_mode())


def transformers_supported() -> tuple[bool, str]:
    import transformers

    parts = transformers.__version__.split(".")
    try:
        ver = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return False, transformers.__version__
    lo, hi = TRANSFORMERS_SUPPORTED
    return lo <= ver <= hi, transformers.__version__


@dataclass
class _Swap:
    target: Any
    attr: str
    old: Any  # _MISSING when the attribute was not set on the target itself (instance methods)


@dataclass
class PatchReport:
    """What ``apply_optimizations`` did to a model.

    Attributes:
        model_type (str): the model's ``config.model_type``.
        enabled (bool): whether any kernel was swapped in.
        requested (bool): whether the optimizations were switched on (they may still have found
            nothing to swap, e.g. on a CPU without the Triton interpreter).
        counts (dict[str, int]): swaps per kind (``rms_norm``, ``glu``, ``rope``, ``lora``, ``loss``).
        skipped (list[str]): what was left plain, and why.
    """

    model_type: str
    enabled: bool = False
    requested: bool = True
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    _swaps: list[_Swap] = field(default_factory=list, repr=False)

    def swap(self, target: Any, attr: str, new: Any, kind: str) -> None:
        """Sets ``target.attr = new``, remembering the old value (or its absence) for ``revert``."""
        old = target.__dict__.get(attr, _MISSING) if hasattr(target, "__dict__") else getattr(target, attr)
        self._swaps.append(_Swap(target, attr, old))
        setattr(target, attr, new)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.enabled = True

    def on_revert(self, undo: Callable[[], None], kind: str) -> None:
        """Records a change that is not an attribute swap; ``undo`` runs at ``revert``."""
        self._swaps.append(_Swap(None, "", undo))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.enabled = True

    def revert(self) -> None:
        """Undoes every swap, newest first."""
        for s in reversed(self._swaps):
            if s.target is None:
                s.old()
            elif s.old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(s.target, s.attr)
            else:
                setattr(s.target, s.attr, s.old)
        self._swaps.clear()
        self.counts.clear()
        self.enabled = False

    def summary(self) -> str:
        done = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing"
        text = f"visionft kernels on {self.model_type}: patched {done}"
        if self.skipped:
            text += "; left plain: " + "; ".join(self.skipped)
        return text


def self_check(fn_new: Callable[[], Any], fn_ref: Callable[[], Any], rel_tol: float) -> bool:
    """Runs both on the same small input and compares (relative L2); False on any error or mismatch."""
    try:
        with torch.no_grad():
            a, b = fn_new(), fn_ref()
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        for x, y in zip(a, b, strict=True):
            x, y = x.double(), y.double()
            if not torch.isfinite(x).all() or (x - y).norm() > rel_tol * y.norm().clamp(min=1e-12):
                return False
        return True
    except Exception as err:
        logger.debug("self-check failed: %r", err)
        return False
