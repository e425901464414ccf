"""A check that a training step could be captured in a CUDA graph, run on any device (CPU in CI).

``CaptureSafety`` is a ``TorchDispatchMode`` that sees every aten op of the code it wraps, forward and
backward, and fails on the ops that read device data on the host or whose output shape depends on
the data: on CUDA each of them is a host-device sync, which a capture refuses (or worse, bakes one
step's answer into every replay):

- reading a value: ``aten._local_scalar_dense`` (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``),
  ``aten.equal``, ``aten.is_nonzero``;
- a data-dependent size: ``nonzero``, ``argwhere``, ``masked_select``, ``masked_scatter`` (its backward
  is a ``masked_select``), ``unique*``, ``repeat_interleave`` with tensor repeats, ``bincount``,
  indexing or index-assignment with a boolean mask;
- a copy out of the device: ``aten._to_copy`` / ``copy_`` from a non-CPU tensor to the CPU (seen on
  CUDA; on the CPU every tensor is already there).

It also records the op sequence with every output's shape (``trace``): two steps on different data
of one row tier must give the same trace, or some shape depends on the data.

Usage::

    with CaptureSafety() as check:
        loss = forward(batch); loss.backward()
    check.trace   # [(op name, output shapes), ...]
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_FORBIDDEN = {
    "aten._local_scalar_dense",
    "aten.equal",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.argwhere",
    "aten.masked_select",
    "aten.masked_scatter",
    "aten.masked_scatter_",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten._unique",
    "aten._unique2",
    "aten.bincount",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


class CaptureUnsafe(AssertionError):
    """An op that a CUDA-graph capture would refuse, or whose result would be baked into the graph."""


def _name(func) -> str:
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def _shapes(out: Any) -> tuple:
    flat, _ = tree_flatten(out)
    return tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))


class CaptureSafety(TorchDispatchMode):
    """Fails on host-device syncs and data-dependent shapes (module docstring).

    Args:
        allow (set[str] | None): op names (``aten.x``) to let through. Default: None.
    """

    def __init__(self, allow: set[str] | None = None) -> None:
        super().__init__()
        self.allow = allow or set()
        self.trace: list[tuple[str, tuple]] = []

    def _check(self, name: str, func, args, kwargs) -> None:
        if name in self.allow:
            return
        if name in _FORBIDDEN:
            raise CaptureUnsafe(f"{func}: reads device data on the host or has a data-dependent shape")
        if name == "aten.repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            if isinstance(repeats, torch.Tensor) or (len(args) == 1):
                raise CaptureUnsafe(
                    f"{func}: repeat_interleave with tensor repeats has a data-dependent size"
                )
        if name in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            for index in indices or ():
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                    raise CaptureUnsafe(f"{func}: boolean-mask indexing has a data-dependent size")
        if name in ("aten._to_copy", "aten.copy_", "aten.to"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = kwargs.get("device")
            if name == "aten.copy_":
                dst_device = args[0].device
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst_device is not None
                and torch.device(dst_device).type == "cpu"
            ):
                raise CaptureUnsafe(f"{func}: copies device data to the host")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        self._check(name, func, args, kwargs)
        out = func(*args, **kwargs)
        self.trace.append((name, _shapes(out)))
        return out


__all__ = ["CaptureSafety", "CaptureUnsafe"]
