"""TRL's ``SFTTrainer`` with this engine's training step.

Two changes, both decided by what the run passes in: the engine's switches (``engine_options``, a
``visionft.engine.options.EngineOptions``) and what ``visionft.patching`` did to the model (``patch_report``):

- ``training_step`` runs forward and backward through ``visionft.engine.cuda_graphs.CudaGraphTrainStep``
  (graph replays where the batch signature allows, eager otherwise). It keeps the Trainer's own
  arithmetic: a model that takes ``num_items_in_batch`` gets it (as a device tensor the graph
  copies in, like the batch) and normalises the loss by it (times the world size when tokens are
  averaged across ranks, as the Trainer's ``compute_loss`` does); otherwise the loss is divided by
  the accumulation steps before backward. The returned loss is the one the Trainer would return.
  Under data parallelism the step runs on the unwrapped model, outside DDP's hooks (they fire
  inside backward, which a graph replays without them), and ``visionft.engine.grad_sync`` averages the
  gradients over the ranks with one all-reduce after the last micro-batch of each optimizer step;
  DDP's wrapper stays for its start-up broadcast and for evaluation, with its reducer detached
  (``grad_sync.detach_ddp_reducer``: it would break graph captures). This holds on CPU (gloo) too,
  where the steps are eager, so CI runs the same code path. It steps aside (the Trainer's own step,
  with one log line saying why) when the optimizations are off, for a custom ``compute_loss_func`` and
  when ``VISIONFT_CUDA_GRAPHS=0``; in a single process also where graphs are unavailable (e.g. on CPU).
- with the optimizations on, bitsandbytes' 8-bit AdamW becomes ``visionft.engine.optim``'s, which skips
  the device sync after every parameter (same updates and state), whether or not the family has fused
  kernels to swap in (a family without them still replays its row steps from graphs).

Neither this trainer nor the DPO one writes Hub model cards into the checkpoints
(``visionft.engine.model_cards``).

With a ``RowCollator`` (fixed-shape rows, ``training.packing``) the row step always runs, with or without
the optimizations (eagerly where graphs are off), since only the row's family forward can read a row;
the data loader runs in a prefetch thread (``visionft.data.prefetch``) that builds the next rows while
the device runs this one and pauses while a graph is captured; tokens seen are counted on the host from
each row; and ``graph_summary`` / ``row_summary`` report the replay share and how full the rows were.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch

from visionft.engine.options import GRAPHS_ENV, EngineOptions

if TYPE_CHECKING:  # pragma: no cover
    from visionft.patching import PatchReport

logger = logging.getLogger(__name__)


@functools.cache
def vision_sft_trainer_class() -> type:
    """The ``SFTTrainer`` subclass (built on first use, so that importing this module needs no TRL).

    Its constructor takes TRL's arguments and two of its own, by keyword:

    - ``engine_options`` (``EngineOptions | None``): the engine's switches; None resolves them from the
      environment alone;
    - ``patch_report`` (``PatchReport | None``): what ``visionft.patching.apply_optimizations`` did to the
      model; None when it did not run (the Trainer's own steps then).
    """
    from trl import SFTTrainer

    from visionft.engine.model_cards import WithoutModelCards

    class VisionSFTTrainer(WithoutModelCards, SFTTrainer):
        """``SFTTrainer`` with CUDA-graph steps and the sync-free 8-bit AdamW (module docstring), and no
        model cards in the checkpoints (``visionft.engine.model_cards``)."""

        _graph_step: Any = None
        _graph_off: str | None = None
        _grad_sync: Any = None
        _prefetch: Any = None
        _row_stats: Any = None

        def __init__(
            self,
            *args: Any,
            engine_options: EngineOptions | None = None,
            patch_report: PatchReport | None = None,
            **kwargs: Any,
        ) -> None:
            self.engine_options = engine_options or EngineOptions.resolve()
            self.patch_report = patch_report
            super().__init__(*args, **kwargs)

        def create_optimizer(self, *args, **kwargs):
            from visionft.engine import optim

            return optim.sync_free_if(
                super().create_optimizer(*args, **kwargs), self.engine_options.optimizations
            )

        def _rows(self) -> Any:
            """The row family when the collator builds fixed-shape rows (``visionft.data.rows``)."""
            return getattr(self.data_collator, "family", None)

        def _own_step(self) -> Any:
            """This engine's step object, or None where the Trainer's own step runs (module docstring)."""
            rows = self._rows()
            eager_only = None
            if self._graph_off is None:
                self._graph_off = self._own_step_unavailable() or ""
                if self._graph_off and rows is not None:
                    # Row batches only run through the row forward: this step, eagerly.
                    if self.compute_loss_func is not None:
                        raise ValueError(
                            "fixed-shape rows (training.packing) run this engine's own forward, which a "
                            "compute_loss_func cannot replace; set training.packing to false"
                        )
                    eager_only, self._graph_off = self._graph_off, ""
                elif self._graph_off:
                    logger.info("the Trainer's own training steps: %s", self._graph_off)
            if self._graph_off:
                return None
            if self._graph_step is None:
                from visionft.engine.cuda_graphs import CudaGraphTrainStep

                dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
                # One warm-up step per row tier: rows have at most two signatures.
                self._graph_step = CudaGraphTrainStep(
                    self.model,
                    self.patch_report,
                    options=self.engine_options,
                    autocast_dtype=dtype,
                    rows=rows,
                    warmup=1 if rows is not None else 2,
                    capture_guard=self._prefetch.paused if self._prefetch is not None else None,
                )
                if eager_only and not self._graph_step.disabled:
                    self._graph_step.disabled = eager_only
                if self.accelerator.num_processes > 1:
                    from visionft.engine.grad_sync import FlatGradientAllReduce

                    self._grad_sync = FlatGradientAllReduce(self.model.parameters())
                    logger.info(
                        "data parallel over %d ranks: %s; gradients averaged by one all-reduce "
                        "of %d values per optimizer step",
                        self.accelerator.num_processes,
                        "eager steps" if self._graph_step.disabled else "CUDA-graph steps",
                        self._grad_sync.numel,
                    )
                elif self._graph_step.disabled and rows is None:
                    self._graph_off = self._graph_step.disabled
                    return None
                elif self._graph_step.disabled:
                    logger.info("row steps run eagerly: %s", self._graph_step.disabled)
            return self._graph_step

        def row_summary(self) -> dict[str, Any] | None:
            """What the trained rows held (rows per tier, samples per row, budget fill); None without rows."""
            return None if self._row_stats is None else self._row_stats.summary()

        def graph_summary(self) -> dict[str, Any] | None:
            """Graph captures, replays and the replay share of this run's steps (None if the Trainer's
            own steps ran)."""
            return None if self._graph_step is None else self._graph_step.summary()

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            if self._rows() is None:
                return loader
            from visionft.data.prefetch import Prefetching

            # Rows are assembled on the host (images decoded, positions and layouts computed): a thread
            # does it for the next steps while the GPU runs this one.
            self._prefetch = Prefetching(loader, self.data_collator, depth=2)
            # Host-side inputs of the row forward (an embedding table kept in host memory) are built
            # in that thread too.
            self.data_collator.prepare = functools.partial(self._rows().host_inputs, self.model)
            return self._prefetch

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                if self._prefetch is not None:
                    self._prefetch.close()
                summary = self.graph_summary()
                if summary is not None:
                    logger.info(
                        "%d steps replayed from CUDA graphs, %d eager (replay share %.1f%%), "
                        "%d graphs captured%s",
                        summary["replays"],
                        summary["eager_steps"],
                        100 * summary["replay_share"],
                        summary["captured"],
                        f"; graphs off: {summary['off']}" if summary["off"] else "",
                    )

        def _track_num_input_tokens(self, inputs):
            from visionft.patching.rows.base import ROW_KEY

            info = inputs.get(ROW_KEY) if isinstance(inputs, dict) else None
            if (
                info is None
                or self.args.include_num_input_tokens_seen == "no"
                or self.accelerator.num_processes > 1
            ):
                return super()._track_num_input_tokens(inputs)
            # The row says on the host how many of its tokens are real: no device read per step.
            self.state.num_input_tokens_seen += (
                info.real_tokens
                if self.args.include_num_input_tokens_seen == "non_padding"
                else info.budget.tokens
            )

        def _own_step_unavailable(self) -> str | None:
            if not self.engine_options.cuda_graphs:
                return f"{GRAPHS_ENV}=0"
            if not self.engine_options.optimizations:
                return "the optimizations are off (training.optimizations)"
            if self.patch_report is None:
                return "no patch report (pass patch_report=visionft.patching.apply_optimizations(model))"
            if self.compute_loss_func is not None:
                return "a compute_loss_func is set"
            return None

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self._own_step()
            if step is None:
                return super().training_step(model, inputs, num_items_in_batch)
            if self._grad_sync is not None:
                # The Trainer has wrapped the model by now (DDP broadcast the weights then); its
                # reducer would break graph captures (grad_sync.detach_ddp_reducer says why). Once
                # detached, the call returns at once.
                from visionft.engine.grad_sync import detach_ddp_reducer

                detach_ddp_reducer(model)
            model.train()
            from visionft.patching.rows.base import ROW_KEY

            if ROW_KEY in inputs:  # a row's tensors go to the device inside the step, asynchronously
                if self._row_stats is None:
                    from visionft.data.row_collator import RowStats

                    self._row_stats = RowStats(self.data_collator.tiers)
                self._row_stats.add(inputs[ROW_KEY])
            else:
                inputs = self._prepare_inputs(inputs)
            world = self.accelerator.num_processes
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # The model divides by the batch's token count (over all micro-batches, and over all
                # ranks when averaged across devices) itself; the averaging all-reduce is then undone
                # by the world size, as in Trainer.compute_loss.
                count = torch.as_tensor(num_items_in_batch, device=self.args.device)
                scale = float(world) if world > 1 and self.args.average_tokens_across_devices else 1.0
                loss = step(inputs, loss_scale=scale, extra={"num_items_in_batch": count})
            else:
                accumulation = getattr(self, "current_gradient_accumulation_steps", None)
                scale = 1.0 / (accumulation or self.args.gradient_accumulation_steps)
                loss = step(inputs, loss_scale=scale)
            if self._grad_sync is not None and self.accelerator.sync_gradients:
                self._grad_sync()

            return (loss * scale).detach()

    return VisionSFTTrainer


__all__ = ["vision_sft_trainer_class"]
