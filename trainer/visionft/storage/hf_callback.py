"""The bridge between HF Trainer's checkpoints and ``CheckpointManager`` (the one storage module that imports
transformers).

HF Trainer writes ``<output_dir>/checkpoint-<step>/`` (weights, optimizer, scheduler, RNG states and
``trainer_state.json``, which holds the position in the data) and then calls ``on_save``. The callback hands
that folder to the manager, which snapshots it and uploads it in the background. At the end of training
``on_train_end`` waits for the uploads. Under DDP, only rank 0 has this callback, and the other ranks' RNG
files reach its folder through ``visionft.engine.checkpoint_rng.GatherRngStatesCallback``, which must run
first.

Resume: ``prepare_resume`` downloads the newest complete checkpoint from S3 into ``output_dir`` under HF's
folder name, and returns its path for ``trainer.train(resume_from_checkpoint=...)``. HF Trainer then restores
adapters, optimizer, scheduler, RNG states and skips the batches already seen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from visionft.storage.checkpoints import CheckpointManager
from visionft.storage.errors import StorageError

logger = logging.getLogger(__name__)

#: HF Trainer's checkpoint folder prefix (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
HF_CHECKPOINT_PREFIX = "checkpoint"


class S3CheckpointCallback(TrainerCallback):
    """Uploads each checkpoint HF Trainer saves, without blocking the training step.

    Args:
        manager (CheckpointManager): where checkpoints go (``<output>/checkpoints/step-XXXXXXXX/``).
        raise_on_upload_error (bool): make ``on_train_end`` raise when a checkpoint upload failed. The
            default only logs it: the final outputs are published separately, and a lost intermediate
            checkpoint costs at most a longer resume. Default: False.
    """

    def __init__(self, manager: CheckpointManager, *, raise_on_upload_error: bool = False) -> None:
        self.manager = manager
        self.raise_on_upload_error = raise_on_upload_error

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Only the main process uploads; the others would send the same files.
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir or ".") / f"{HF_CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():
            logger.warning(
                "on_save at step %d but %s does not exist; nothing uploaded", state.global_step, folder
            )
            return
        self.manager.save(folder, state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        try:
            self.manager.flush()
        except StorageError as exc:
            if self.raise_on_upload_error:
                raise
            logger.error("a checkpoint upload failed (training itself finished): %s", exc)


def prepare_resume(manager: CheckpointManager, output_dir: str | Path) -> str | None:
    """Download the newest complete checkpoint into ``output_dir`` for HF Trainer to resume from.

    A local checkpoint at the same or a later step (a restart on the same node) is preferred and nothing
    is downloaded.

    Args:
        manager (CheckpointManager): the run's checkpoint manager.
        output_dir (str | Path): HF Trainer's ``args.output_dir``.

    Returns:
        str | None: the path to pass as ``resume_from_checkpoint``, or None to start fresh.
    """
    output_dir = Path(output_dir)
    local = newest_local_checkpoint(output_dir)
    latest = manager.find_latest_complete()
    if latest is None:
        return str(local[1]) if local else None
    if local is not None and local[0] >= latest.step:
        return str(local[1])
    folder = manager.download_latest(output_dir, folder=f"{HF_CHECKPOINT_PREFIX}-{{step}}")
    return str(folder) if folder else None


def newest_local_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """The newest ``checkpoint-N`` folder whose ``trainer_state.json`` exists (HF writes it last), or None."""
    found = []
    for path in output_dir.glob(f"{HF_CHECKPOINT_PREFIX}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return max(found, default=None)
