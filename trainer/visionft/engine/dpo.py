"""TRL's ``DPOTrainer`` on this engine's model: the LoRA model of ``FastVisionModel`` with its patched
modules, batches from ``visionft.data.preference.PreferenceCollator``.

What it changes in TRL's trainer, each for one reason:

- the reference is the frozen base model with the adapters disabled (``PeftModel.disable_adapter``), so no
  second copy of the model is loaded: TRL copies a PEFT model's adapter into a frozen "ref" adapter, which
  for a new adapter (LoRA's B starts at zero) is the base model again; that copy is deleted, and each
  batch's reference log-probabilities are computed here, under ``torch.no_grad``, and handed to TRL's loss
  as it takes precomputed ones. This also keeps activation checkpointing as the run set it: TRL's own
  reference pass switches it off and back on with its own arguments around every batch;
- the adapters keep the dtype the model was given (float32 master weights, as in supervised training):
  TRL casts them to bfloat16 on a quantized model;
- datasets are not prepared by TRL (tokenized up front): the collator builds every batch, images included;
- where kernels were swapped in, bitsandbytes' 8-bit AdamW becomes ``visionft.engine.optim``'s, which
  skips the device sync after every parameter, as in ``visionft.engine.trainer``;
- no Hub model cards in the checkpoints (``visionft.engine.model_cards``): the run's record is its own.

The log-probabilities come from TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``: the hidden
states of the answer tokens projected in chunks, the full logits never built), over this engine's patched
backbone (RMSNorm, gated MLP, rotary and LoRA kernels where ``visionft.patching`` applied them). The fused
cross-entropy of supervised training does not apply: DPO needs per-token log-probabilities of two answers,
not one loss. Steps run eagerly through the Trainer's own ``training_step`` (no CUDA-graph step).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch

from visionft.engine.options import EngineOptions

if TYPE_CHECKING:  # pragma: no cover
    from visionft.patching import PatchReport

logger = logging.getLogger(__name__)

#: Batch keys that are not model inputs.
_NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
#: The adapter TRL adds as the reference of a PEFT model.
_TRL_REFERENCE_ADAPTER = "ref"


@functools.cache
def vision_dpo_trainer_class() -> type:
    """The ``DPOTrainer`` subclass (built on first use, so that importing this module needs no TRL).

    Its constructor takes TRL's arguments and two of its own, by keyword: ``engine_options``
    (``EngineOptions | None``) and ``patch_report`` (``PatchReport | None``), as
    ``visionft.engine.trainer.vision_sft_trainer_class`` does. ``model`` must be a PEFT model.
    """
    from peft import PeftModel
    from trl import DPOTrainer

    from visionft.engine.model_cards import WithoutModelCards

    class VisionDPOTrainer(WithoutModelCards, DPOTrainer):
        """``DPOTrainer`` against the base model with the adapters off (module docstring), and no model
        cards in the checkpoints (``visionft.engine.model_cards``)."""

        def __init__(
            self,
            *args: Any,
            engine_options: EngineOptions | None = None,
            patch_report: PatchReport | None = None,
            **kwargs: Any,
        ) -> None:
            model = kwargs.get("model", args[0] if args else None)
            if not isinstance(model, PeftModel):
                raise TypeError(
                    "VisionDPOTrainer trains LoRA adapters: pass the model of FastVisionModel.get_peft_model"
                )
            self.engine_options = engine_options or EngineOptions.resolve()
            self.patch_report = patch_report
            dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
            super().__init__(*args, **kwargs)
            if _TRL_REFERENCE_ADAPTER in model.peft_config:
                model.delete_adapter(_TRL_REFERENCE_ADAPTER)
            for name, param in model.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])
            # TRL's loss reads each batch's reference log-probabilities from the batch (compute_loss).
            self.precompute_ref_logps = True
            logger.info("DPO steps run eagerly (the CUDA-graph step is supervised training's)")

        def graph_summary(self) -> None:
            """None: DPO steps are the Trainer's own (``visionft.engine.trainer`` reports its graphs)."""
            return None

        def row_summary(self) -> None:
            """None: preference pairs are padded rows, never fixed-shape packed rows."""
            return None

        def _prepare_dataset(self, dataset, *args: Any, **kwargs: Any):
            return dataset  # the collator encodes every pair when its batch is built

        def create_optimizer(self, *args, **kwargs):
            from visionft.engine import optim

            return optim.sync_free_if(
                super().create_optimizer(*args, **kwargs), self.engine_options.optimizations
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "ref_chosen_logps" not in inputs:
                chosen, rejected = self.reference_log_probs(inputs)
                inputs = {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        @torch.no_grad()
        def reference_log_probs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            """The summed log-probabilities of each pair's chosen and rejected answer under the reference:
            the model with its adapters disabled."""
            peft_model = self.accelerator.unwrap_model(self.model)
            kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            with peft_model.disable_adapter():
                out = peft_model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
            logps = out.log_probs[:, -(labels.shape[1] - 1) :].sum(dim=1)
            return logps.chunk(2, dim=0)

    return VisionDPOTrainer


__all__ = ["vision_dpo_trainer_class"]
