"""Every rank's RNG state in the checkpoint that rank 0 uploads, so that a resume works for any world size.

Under DDP the Hugging Face Trainer saves one ``rng_state_<rank>.pth`` per rank, each rank into the
``checkpoint-<step>/`` folder on its own disk (``Trainer._save_rng_state``: Python, NumPy, torch CPU and,
with CUDA, every visible GPU's state). Only rank 0 uploads checkpoints (``visionft.storage``'s
``S3CheckpointCallback``), so on a multi-node run the files of the other nodes' ranks would never reach
S3, and on resume those ranks would log "Didn't find an RNG file" and go on with a fresh RNG; nor would
rank 0 wait for the other ranks' files, even on its own node.

``GatherRngStatesCallback`` runs on every rank. In ``on_save``, which the Trainer calls after its whole
``_save_checkpoint`` (RNG file included) on that rank, each rank reads back the bytes of its own
``rng_state_<rank>.pth`` and ``gather_object`` brings them to rank 0, which writes the files its folder
lacks (or holds with other bytes; replaced atomically, since a previous snapshot may hard-link the old
file). The files are the Trainer's own bytes, so ``Trainer._load_rng_state`` reads them on resume as if
the rank had written them there. A rank reaches the gather only after its file is complete, so once
rank 0's ``on_save`` returns, its folder is complete; no barrier is needed after it. The callback must
come before the upload callback in the Trainer's list (callbacks run in the order they were added):
``visionft.job.run`` passes it to the constructor and adds the upload callback afterwards.

Rank 0 also writes ``rng_state.pth``, the name the Trainer reads in a single process, from its own state:
the same dict, except that each accelerator's per-device list (a DDP rank saves ``get_rng_state_all()``)
becomes the state of rank 0's own device, as a single process saves it.

Resuming with another world size (``Trainer._load_rng_state``, transformers 5.x):

- One process: it loads ``rng_state.pth``, so it continues with rank 0's RNG.
- ``W > 1`` ranks: rank ``r`` loads ``rng_state_<r>.pth``. With fewer ranks than the checkpoint had, the
  files of ranks that no longer exist are ignored. With more, the ranks numbered from the saved world
  size up find no file, log "Didn't find an RNG file" and keep the RNG that the Trainer seeded from
  ``training.seed`` (the same seed on every rank, as at a fresh start): their random draws (LoRA dropout)
  repeat each other's and continue no saved rank's, while the ranks below the saved world size restore
  their own. A single process's checkpoint (only ``rng_state.pth``) leaves every rank of a DDP resume on
  the seeded RNG in the same way.

Either way the run resumes (weights, optimizer, scheduler, data position); only randomness differs from an
uninterrupted run. A CUDA state saved with more visible GPUs than the resuming rank has fails to load; the
Trainer logs the error and continues.

In a single process (or without a process group) the callback does nothing.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


#: The Trainer's name for the RNG file of a single process.
SINGLE_PROCESS_RNG_FILE = "rng_state.pth"
#: Keys of the Trainer's RNG dict that a DDP rank saves as one state per visible device (get_rng_state_all).
PER_DEVICE_KEYS = ("cuda", "npu", "hpu", "mlu", "musa")


def rng_file_name(process_index: int) -> str:
    """The Trainer's name for one rank's RNG file under DDP: ``rng_state_<rank>.pth``."""
    return f"rng_state_{process_index}.pth"


def single_process_state(states: dict[str, Any], device_index: int) -> dict[str, Any]:
    """A DDP rank's RNG dict in the form a single process saves it.

    Args:
        states (dict): the dict of ``rng_state_<rank>.pth`` (``python``, ``numpy``, ``cpu`` and per
            accelerator a list of every visible device's state).
        device_index (int): the rank's own device among them.

    Returns:
        dict: the same states, each accelerator's list replaced by the state of ``device_index`` (a single
        process saves ``get_rng_state()`` of its current device, and loads it with ``set_rng_state``).
    """
    out = dict(states)
    for key in PER_DEVICE_KEYS:
        if isinstance(out.get(key), list | tuple):
            out[key] = out[key][device_index]
    return out


class GatherRngStatesCallback(TrainerCallback):
    """Copies every rank's ``rng_state_<rank>.pth`` into rank 0's checkpoint folder at each save, and
    writes ``rng_state.pth`` there from rank 0's state.

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
                    logger.warning("rank %d saved no RNG state at step %d", index, state.global_step)
                continue
            path = folder / rng_file_name(index)
            if index == args.process_index or (path.is_file() and path.read_bytes() == data):
                continue  # rank 0's own file, or one written by a rank on this node's disk
            _write_atomically(path, data)
            written.append(path.name)
        if own.is_file():
            _write_single_process_state(own, folder / SINGLE_PROCESS_RNG_FILE)
            written.append(SINGLE_PROCESS_RNG_FILE)
        if written:
            logger.info("step %d: wrote %s into rank 0's checkpoint", state.global_step, written)


def _write_single_process_state(own: Path, path: Path) -> None:
    """Writes rank 0's RNG state (its file ``own``) to ``path`` in the single-process form, so that a
    single process resuming the checkpoint continues with rank 0's RNG instead of a fresh one."""
    # A file that this process's Trainer has just written (numpy's state needs more than weights_only).
    states = torch.load(own, weights_only=False)
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    buffer = io.BytesIO()
    torch.save(single_process_state(states, device), buffer)
    _write_atomically(path, buffer.getvalue())


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
