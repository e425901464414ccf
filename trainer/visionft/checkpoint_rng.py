"""Every rank's RNG state in the checkpoint that rank 0 uploads (issue 9: resume works for any world size).

Under DDP the Hugging Face Trainer saves one ``rng_state_<rank>.pth`` per rank, each rank into the
``checkpoint-<step>/`` folder on its own disk (``Trainer._save_rng_state``: Python, NumPy, torch CPU and,
with CUDA, every visible GPU's state). Only rank 0 uploads checkpoints (``visionft.storage``'s
``S3CheckpointCallback``), so on a multi-node run the files of the other nodes' ranks never reached S3,
and on resume those ranks logged "Didn't find an RNG file" and went on with a fresh RNG. Nothing made
rank 0 wait for the other ranks' files either, even on its own node.

``GatherRngStatesCallback`` runs on every rank. In ``on_save``, which the Trainer calls after its whole
``_save_checkpoint`` (RNG file included) on that rank, each rank reads back the bytes of its own
``rng_state_<rank>.pth`` and ``gather_object`` brings them to rank 0, which writes the files its folder
lacks (or holds with other bytes; replaced atomically, since a previous snapshot may hard-link the old
file). The files are the Trainer's own bytes, so ``Trainer._load_rng_state`` reads them on resume as if
the rank had written them there. A rank reaches the gather only after its file is complete, so once
rank 0's ``on_save`` returns, its folder is complete; no barrier is needed after it. The callback must
come before the upload callback in the Trainer's list (callbacks run in the order they were added):
``visionft.run`` passes it to the constructor and adds the upload callback afterwards.

Resuming with another world size (``Trainer._load_rng_state``, transformers 5.x): with ``W > 1`` ranks,
rank ``r`` loads ``rng_state_<r>.pth``; ranks beyond the saved world size find no file, log "Didn't find an
RNG file" and keep the RNG seeded from ``training.seed``, and files of ranks that no longer exist are
ignored. A single process loads only ``rng_state.pth``, which a DDP run does not write, so it starts
from the seeded RNG as well. Either way the run resumes (weights, optimizer, scheduler, data position);
only randomness (LoRA dropout) differs from an uninterrupted run. A CUDA state saved with more visible
GPUs than the resuming rank has fails to load; the Trainer logs the error and continues.

In a single process (or without a process group) the callback does nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


def rng_file_name(process_index: int) -> str:
    """The Trainer's name for one rank's RNG file under DDP: ``rng_state_<rank>.pth``."""
    return f"rng_state_{process_index}.pth"


class GatherRngStatesCallback(TrainerCallback):
    """Copies every rank's ``rng_state_<rank>.pth`` into rank 0's checkpoint folder at each save.

    Add it on every rank (``on_save`` is a collective), before the checkpoint upload callback.
    """

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size <= 1 or not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            return
        folder = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        own = folder / rng_file_name(args.process_index)
        # Absent when the Trainer saves no RNG state (save_only_model); every rank still joins the gather.
        payload = (args.process_index, own.read_bytes() if own.is_file() else None)
        main = torch.distributed.get_rank() == 0
        gathered: list | None = [None] * torch.distributed.get_world_size() if main else None
        torch.distributed.gather_object(payload, gathered, dst=0)
        if not main:
            return
        assert gathered is not None
        written = []
        for index, data in gathered:
            if data is None:
                if not args.save_only_model:
                    logger.warning(
                        "visionft: rank %d saved no RNG state at step %d", index, state.global_step
                    )
                continue
            path = folder / rng_file_name(index)
            if index == args.process_index or (path.is_file() and path.read_bytes() == data):
                continue  # rank 0's own file, or one written by a rank on this node's disk
            _write_atomically(path, data)
            written.append(path.name)
        if written:
            logger.info("visionft: step %d: wrote %s from other nodes' ranks", state.global_step, written)


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it over ``path``.

    A rename gives a new inode, so a hard-linked snapshot of an older file (``CheckpointManager``) keeps its
    bytes, and a reader never sees a half-written file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
