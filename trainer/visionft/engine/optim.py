"""bitsandbytes' 8-bit AdamW without a device synchronisation after every parameter.

Why: ``bitsandbytes.optim.Optimizer8bit.step`` (0.45–0.50) calls ``torch.cuda.synchronize()``
after updating each parameter, which only its paged states need. QLoRA with LoRA on every linear
layer has hundreds of small adapter tensors (716 for a Qwen2.5-VL-7B), so every optimizer step
waits for the GPU hundreds of times, and cannot be queued behind a forward/backward still running
on the GPU (a CUDA-graph replay, ``visionft.engine.cuda_graphs``). ``AdamW8bit`` here runs the same
per-parameter updates (bitsandbytes' own ``init_state`` / ``prefetch_state`` / ``update_step``, so
the same numbers, state layout and checkpoints) and synchronises only where a state is paged.

This is the one place that depends on that loop of bitsandbytes; ``tests/trainer/engine/test_cuda_graphs_gpu.py``
checks that it gives the same parameters as bitsandbytes' own class.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def _step_without_per_parameter_sync(self, closure=None):
    """``Optimizer8bit.step`` with one sync at the end, and only for paged states."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            self.update_step(group, p, gindex, pindex)
    if self.is_paged:
        torch.cuda.synchronize()  # paged states are moved asynchronously
    return loss


@functools.cache
def _sync_free(cls: type) -> type:
    return type(cls.__name__, (cls,), {"step": _step_without_per_parameter_sync, "__module__": __name__})


def remove_per_parameter_sync(optimizer: torch.optim.Optimizer) -> bool:
    """Makes a bitsandbytes 8-bit/32-bit optimizer (any ``Optimizer8bit``: AdamW, Adam, Lion, ...) step
    without the per-parameter sync, in place (same state and layout: only ``step`` differs).
    Returns whether it did; paged optimizers and other classes are left alone."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    if not isinstance(optimizer, Optimizer8bit) or optimizer.is_paged:
        return False
    if type(optimizer).step is not _step_without_per_parameter_sync:
        optimizer.__class__ = _sync_free(type(optimizer))
    return True


def sync_free_if(optimizer: torch.optim.Optimizer, optimizations: bool) -> torch.optim.Optimizer:
    """The Trainer's optimizer, made sync-free (``remove_per_parameter_sync``) where the run's
    optimizations are on, whether or not its family has fused kernels; returned for chaining."""
    if optimizations and remove_per_parameter_sync(optimizer):
        logger.info("%s (bitsandbytes) without per-parameter device syncs", type(optimizer).__name__)
    return optimizer


def adamw_8bit(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit(params, **kwargs)`` (lr, betas, eps, ...), stepping without per-parameter syncs."""
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    remove_per_parameter_sync(optimizer)
    return optimizer


__all__ = ["adamw_8bit", "remove_per_parameter_sync", "sync_free_if"]
