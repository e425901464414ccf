"""Data-parallel gradient averaging as one all-reduce of one flat buffer, run after backward.

Why not DDP's reducer: DDP all-reduces gradients from hooks that fire inside backward, bucket by
bucket. A CUDA-graph step (``visionft.engine.cuda_graphs``) replays forward + backward as one launch, so
no hook runs during a replay, and a hook that communicates could not be captured anyway. For QLoRA
the trade is cheap: only the LoRA weights have gradients (about 52 M values for a 7B VLM at r=16,
208 MB in fp32), which one NCCL all-reduce moves in about a millisecond over NVLink, while the
backward it would have overlapped with takes a hundred times longer.

``FlatGradientAllReduce`` keeps one persistent buffer per gradient dtype. Each call copies the
gradients in (one ``cat``), all-reduces and averages the buffer, and points every ``.grad`` at its
slice of it, so the optimizer reads the averaged values without a copy back. The result is what
DDP gives: every rank holds the mean of the ranks' gradients. A parameter without a gradient on
this rank counts as zeros (DDP with ``find_unused_parameters`` does the same).

The caller decides when to call it: once per optimizer step, after the last micro-batch's
backward (gradient accumulation sums locally first, as DDP's ``no_sync`` does).

``detach_ddp_reducer`` is this package's one patch of DDP's internals, for the Trainer, which wraps
the model in DDP itself (module docstring of the function says why it is needed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


class FlatGradientAllReduce:
    """Averages the gradients of ``params`` over ``group`` (module docstring).

    Args:
        params (Iterable[nn.Parameter]): the trainable parameters, in the same order on every rank.
        group (dist.ProcessGroup | None): the process group; None for the default one.
    """

    def __init__(self, params: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatGradientAllReduce needs at least one parameter that requires grad")
        self.group = group
        self._by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            self._by_dtype.setdefault(p.dtype, []).append(p)
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        #: How many times the gradients were averaged (for logs and tests).
        self.calls = 0

    @property
    def numel(self) -> int:
        """How many gradient values each call all-reduces."""
        return sum(p.numel() for p in self.params)

    def _buffer(self, dtype: torch.dtype, params: list[nn.Parameter]) -> torch.Tensor:
        flat = self._buffers.get(dtype)
        if flat is None:
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            self._buffers[dtype] = flat
        return flat

    @staticmethod
    def _in_buffer(flat: torch.Tensor, params: list[nn.Parameter]) -> bool:
        offset, base, size = 0, flat.data_ptr(), flat.element_size()
        for p in params:
            g = p.grad
            if g is None or not g.is_contiguous() or g.data_ptr() != base + offset * size:
                return False
            offset += p.numel()
        return True

    def __call__(self) -> None:
        """Replaces every ``.grad`` by the mean over the group's ranks (a view into the flat buffer)."""
        world = dist.get_world_size(self.group)
        for dtype, params in self._by_dtype.items():
            flat = self._buffer(dtype, params)
            # Gradients accumulated in place into last call's views are already in the buffer (and a
            # cat into the memory it reads from is not allowed).
            if not self._in_buffer(flat, params):
                pieces = [
                    p.grad.reshape(-1) if p.grad is not None else flat.new_zeros(p.numel()) for p in params
                ]
                torch.cat(pieces, out=flat)
            # SUM then divide: gloo (CPU) has no AVG, and dividing the one buffer is a single kernel.
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(world)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self.calls += 1


def detach_ddp_reducer(ddp: nn.Module) -> bool:
    """Turns a ``DistributedDataParallel`` wrapper into a plain forwarding one: no reducer, no hooks.

    Why: DDP's reducer holds every parameter's ``AccumulateGrad`` node from DDP's construction on, to
    hook it. Since torch 2.9 such a node keeps the stream that was current when it was made (the
    default stream, at wrap time), so a backward captured into a CUDA graph, which runs on a side
    stream, must wait on the default stream there, and the capture fails ("operation would make the
    legacy stream depend on a capturing blocking stream"; seen under torchrun on 2 H200s). Without
    the reducer nothing holds those nodes, and each forward makes fresh ones on its own stream, as
    in a single process. ``FlatGradientAllReduce`` does the averaging instead; the wrapper stays for
    the Trainer (``no_sync``, evaluation forwards, unwrapping).

    How: DDP already has a state without a C++ reducer, the one ``delay_all_reduce_named_params``
    builds when it covers every parameter; with ``_delay_all_reduce_all_params`` set, ``forward``
    calls the module directly and touches neither reducer nor logger (torch 2.2 and later). The
    logger holds the reducer too, so both references go.

    Args:
        ddp (nn.Module): the wrapper (anything else is left alone).

    Returns:
        bool: whether a reducer was detached (False for a non-DDP module or one already detached).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp, DistributedDataParallel) or not hasattr(ddp, "reducer"):
        return False
    if not hasattr(ddp, "_delay_all_reduce_all_params"):
        raise RuntimeError(
            "this torch's DistributedDataParallel has no reducer-free state (_delay_all_reduce_all_params); "
            "set VISIONFT_CUDA_GRAPHS=0 to train with DDP's own hooks"
        )
    ddp._delay_all_reduce_all_params = True
    ddp.logger = None
    del ddp.reducer
    return True


__all__ = ["FlatGradientAllReduce", "detach_ddp_reducer"]
