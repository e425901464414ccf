"""No Hub model cards in a run's checkpoints.

Two libraries write a ``README.md`` model card on every checkpoint save: TRL's trainers into
``args.output_dir`` (``_save_checkpoint`` calls ``create_model_card``, unconditionally on the main
process), and PEFT's ``save_pretrained`` into each ``checkpoint-<step>`` folder, which the run uploads to
S3 as one of the checkpoint's files. Neither card is true of a run (it names the checkpoints folder as the
model and a scratch path as the base) and a run never pushes to the Hub: its record is ``run.json`` and
``metrics.json``. ``WithoutModelCards`` goes before the TRL trainer class in a subclass's bases and keeps
both cards out; the published adapter (``model.save_pretrained`` of the job, not a checkpoint) keeps
PEFT's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The file name both libraries give the card.
MODEL_CARD = "README.md"


class WithoutModelCards:
    """Mixin for a ``transformers.Trainer`` subclass (module docstring)."""

    args: Any

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes nothing: TRL calls this at every checkpoint; the Trainer itself only from ``push_to_hub``."""
        return None

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        if self.args.should_save:
            (Path(output_dir or self.args.output_dir) / MODEL_CARD).unlink(missing_ok=True)


__all__ = ["MODEL_CARD", "WithoutModelCards"]
