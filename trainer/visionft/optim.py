"""bitsandbytes' 8-bit AdamW without a device synchronisation after every parameter.

Why: ``bitsandbytes.optim.Optimizer8bit.step`` (0.45–0.50) calls ``torch.cuda.synchronize()``
after updating each parameter, which only its paged states need. QLoRA with LoRA on every linear
layer has hundreds of small adapter tensors (716 for a Qwen2.5-VL-7B), so every optimizer step
waits for the GPU hundreds of times, and cannot be queued behind a forward/backward still running
on the GPU (a CUDA-graph replay, ``visionft.cuda_graphs``). ``AdamW8bit`` here runs the same
per-parameter updates (bitsandbytes' own ``init_state`` / ``prefetch_state`` / ``update_step``, so
the same numbers, state layout and checkpoints) and synchronises only where a state is paged.

This is the one place that depends on that loop of bitsandbytes; ``tests/patching/test_cuda_graphs_gpu.py``
checks that it gives the same parameters as bitsandbytes' own class.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def adamw_8bit_class() -> type[torch.optim.Optimizer]:
    """The class (built on first use: bitsandbytes is imported only where a GPU run needs it)."""
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        """``bitsandbytes.optim.AdamW8bit`` minus the per-parameter ``torch.cuda.synchronize()``."""

        @torch.no_grad()
        def step(self, closure=None):
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

    return AdamW8bit


def adamw_8bit(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``AdamW8bit(params, **kwargs)``; the keyword arguments are bitsandbytes' (lr, betas, eps, ...)."""
    return adamw_8bit_class()(params, **kwargs)


__all__ = ["adamw_8bit", "adamw_8bit_class"]
