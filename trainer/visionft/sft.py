"""TRL's ``SFTTrainer`` with this engine's training step.

Two changes, both active only when ``visionft.patching`` optimized the model (``training.optimizations``):

- ``training_step`` runs forward and backward through ``visionft.cuda_graphs.CudaGraphTrainStep``
  (graph replays where the batch signature allows, eager otherwise). It keeps the Trainer's own
  arithmetic: a model that takes ``num_items_in_batch`` gets it (as a device tensor the graph
  copies in, like the batch) and normalises the loss by it; otherwise the loss is divided by the
  accumulation steps before backward. The returned loss is the one the Trainer would return. It
  steps aside (the Trainer's own step, with one log line saying why) for DDP (the all-reduce hooks
  run inside backward and are not captured), a custom ``compute_loss_func``, and when
  ``VISIONFT_CUDA_GRAPHS=0``.
- bitsandbytes' 8-bit AdamW becomes ``visionft.optim``'s, which skips the device sync after every
  parameter (same updates and state).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

logger = logging.getLogger("visionft.sft")

#: ``VISIONFT_CUDA_GRAPHS=0`` keeps the optimizations but runs every step eagerly.
GRAPHS_ENV = "VISIONFT_CUDA_GRAPHS"


def _optimized(model: torch.nn.Module) -> bool:
    from visionft.patching import patch_report

    report = patch_report(model)
    return bool(report is not None and report.enabled)


@functools.cache
def vision_sft_trainer_class() -> type:
    """The ``SFTTrainer`` subclass (built on first use, so that importing this module needs no TRL)."""
    from trl import SFTTrainer

    class VisionSFTTrainer(SFTTrainer):
        """``SFTTrainer`` with CUDA-graph steps and the sync-free 8-bit AdamW (module docstring)."""

        _graph_step: Any = None
        _graph_off: str | None = None
        _said_scaled = False

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if _optimized(self.model):
                from visionft.optim import remove_per_parameter_sync

                if remove_per_parameter_sync(optimizer):
                    logger.info(
                        "visionft: %s (bitsandbytes) without per-parameter device syncs",
                        type(optimizer).__name__,
                    )
            return optimizer

        def _graph_step_for(self, num_items_in_batch) -> Any:
            if self._graph_off is None:
                self._graph_off = self._graphs_unavailable()
                if self._graph_off:
                    logger.info("visionft: eager training steps: %s", self._graph_off)
            if self._graph_off:
                return None
            if self.compute_loss_func is not None:
                if not self._said_scaled:
                    self._said_scaled = True
                    logger.info("visionft: eager steps: a compute_loss_func is set")
                return None
            if self._graph_step is None:
                from visionft.cuda_graphs import CudaGraphTrainStep

                dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
                self._graph_step = CudaGraphTrainStep(self.model, autocast_dtype=dtype)
                if self._graph_step.disabled:
                    self._graph_off = self._graph_step.disabled
                    return None
            return self._graph_step

        def _graphs_unavailable(self) -> str | None:
            if os.environ.get(GRAPHS_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
                return f"{GRAPHS_ENV}=0"
            if not _optimized(self.model):
                return "the optimizations are off (training.optimizations)"
            if self.args.world_size > 1:
                return "distributed training (the DDP all-reduce runs inside backward and is not captured)"
            return None

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self._graph_step_for(num_items_in_batch)
            if step is None:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            inputs = self._prepare_inputs(inputs)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # The model divides by the batch's token count across accumulation steps itself.
                count = torch.as_tensor(num_items_in_batch, device=self.args.device)
                return step(inputs, extra={"num_items_in_batch": count}).detach()
            accumulation = getattr(self, "current_gradient_accumulation_steps", None)
            scale = 1.0 / (accumulation or self.args.gradient_accumulation_steps)
            loss = step(inputs, loss_scale=scale)
            return loss.detach() * scale

    return VisionSFTTrainer


__all__ = ["GRAPHS_ENV", "vision_sft_trainer_class"]
