"""What the trainer needs to run under ``torchrun`` (DDP, one process per GPU; gloo on CPU in CI).

The launcher (torchrun, started by the operator's Indexed Job) sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. The Hugging Face Trainer (via
accelerate) initialises the process group itself from those; this module only reads them, so every
helper here also works before the process group exists and in a plain single process (rank 0 of 1).

How the pieces fit:

- **Model placement.** Each rank loads its own (4-bit) model onto its own GPU:
  ``from_pretrained(..., device_map=device_map())``. Without it ``visionft.model.loading`` places a 4-bit model
  on ``torch.cuda.current_device()``, which is GPU 0 on every rank unless ``torch.cuda.set_device`` ran.
- **Gradients.** DDP's reducer covers only parameters with ``requires_grad``; with a frozen (4-bit) base
  that is the LoRA weights alone (``ddp_reduced_parameter_count`` checks it on a wrapped model).
- **DDP settings.** ``ddp_training_kwargs()`` gives the ``TrainingArguments``/``SFTConfig`` fields:
  ``ddp_find_unused_parameters=False`` (every LoRA weight takes part in every step when vision and
  language layers are both tuned; a search for unused ones costs a graph walk each step) and
  ``ddp_backend`` (``gloo`` on CPU, ``nccl`` on GPU). Activation checkpointing must be non-reentrant
  (``get_peft_model`` sets ``use_reentrant=False``); reentrant checkpointing re-runs the forward inside
  backward, which makes DDP's hooks fire twice for the same parameter.
- **Data.** accelerate shards the Trainer's dataloader per rank: one seeded sampler order (same on every
  rank, from ``data_seed``), cut into per-device batches that are dealt out in turn: with per-device
  batch ``B`` and world size ``W``, rank ``r`` gets positions ``[(s*W + r)*B, (s*W + r + 1)*B)`` of the
  order at step ``s``. So a step of ``W`` ranks sees the same samples as one process with batch ``W*B``
  (``tests/trainer/engine/test_ddp.py`` checks this).
- **Writes.** Only the main process writes outputs (adapter, merged weights, ``loss.png``, ``run.json``),
  uploads to S3 and reports status; the Trainer already saves checkpoints from rank 0 only, except each
  rank's ``rng_state_<rank>.pth``, which it writes into that rank's own (node-local) checkpoint folder.
  ``visionft.engine.checkpoint_rng.GatherRngStatesCallback`` gathers those into rank 0's folder at each save,
  before rank 0 uploads it, so a resume on any node restores every rank's RNG (and adds rank 0's as
  ``rng_state.pth``, which a single process resuming the checkpoint reads).
- **Inputs.** The S3 sync of dataset and model happens before the Trainer exists. ``setup()`` creates the
  process group early (accelerate then reuses it) so that one process per node (``is_local_main_process``)
  can download while the others wait at ``barrier()``.
- **Progress.** ``trainer.state.global_step`` is already the global (optimizer) step, and with
  ``include_num_input_tokens_seen`` the Trainer gathers ``state.num_input_tokens_seen`` over ranks (the
  test sees the job total on every rank), so ``visionft.job.reporting.ProgressCallback``'s tokens/s is already
  the aggregate; it must only print and patch status on the main process. For loops outside the Trainer
  (``bench/ddp_scaling.py``), ``aggregate_tokens_per_second`` sums each rank's rate (an all-reduce; every
  rank must call it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def rank() -> int:
    """The global rank of this process (``RANK``); 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """The rank of this process on its node (``LOCAL_RANK``); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes train together (``WORLD_SIZE``); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True when more than one process trains together."""
    return world_size() > 1


def is_main_process() -> bool:
    """True on global rank 0: the one process that writes outputs, uploads and reports status."""
    return rank() == 0


def is_local_main_process() -> bool:
    """True on local rank 0: the one process per node that downloads inputs into the node's disk."""
    return local_rank() == 0


def setup() -> bool:
    """Under torchrun: selects this rank's GPU and creates the default process group, once.

    Call it first thing in the run (before syncing inputs), so that ``barrier()`` works before the
    Trainer exists; accelerate reuses an existing group. Does nothing in a single process.

    Returns:
        bool: True when a process group exists after the call.
    """
    if not is_distributed():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend())
    return True


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def device_map() -> dict[str, int] | None:
    """The ``device_map`` that puts the whole model on this rank's GPU (``{"": LOCAL_RANK}``), or None on
    CPU (the model stays where transformers builds it)."""
    if torch.cuda.is_available():
        return {"": local_rank()}
    return None


def backend() -> str:
    """The collective backend for this machine: ``nccl`` with CUDA, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def ddp_training_kwargs() -> dict:
    """The ``TrainingArguments``/``SFTConfig`` fields DDP needs; empty in a single process.

    Returns:
        dict: ``ddp_backend`` and ``ddp_find_unused_parameters=False`` under torchrun (see the module
        docstring for why), else ``{}``.
    """
    if not is_distributed():
        return {}
    return {"ddp_backend": backend(), "ddp_find_unused_parameters": False}


@contextmanager
def local_main_first():
    """Runs the block on each node's local main process first, then on the node's other ranks.

    For per-node work that the other ranks then reuse: syncing inputs from S3 (a second sync of an
    unchanged prefix transfers nothing), generating builtin:// sources. Every rank calls
    ``barrier()`` exactly once, so the collective calls match.
    """
    if not is_local_main_process():
        barrier()
    yield
    if is_local_main_process():
        barrier()


def barrier() -> None:
    """Waits for every rank (no-op without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(value: float) -> float:
    """``value`` summed over all ranks (itself without a process group). Every rank must call it.

    Args:
        value (float): this rank's number.

    Returns:
        float: the sum over ranks.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(value)
    dev = device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return float(t.item())


def aggregate_tokens_per_second(local_tokens: float, local_seconds: float) -> float:
    """Tokens per second of the whole job: the sum of each rank's rate. Every rank must call it.

    Args:
        local_tokens (float): tokens this rank processed in the window.
        local_seconds (float): the window's wall time on this rank.

    Returns:
        float: the summed rate (0 when the window is empty).
    """
    rate = local_tokens / local_seconds if local_seconds > 0 else 0.0
    return all_reduce_sum(rate)


def ddp_reduced_parameter_count(module) -> int | None:
    """How many parameters DDP all-reduces for ``module`` (a ``DistributedDataParallel``), else None.

    DDP registers gradient hooks only for parameters with ``requires_grad``; this counts those it holds,
    so a test can check that a frozen base contributes nothing to the all-reduce.
    """
    if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return None
    return sum(1 for p in module.module.parameters() if p.requires_grad)
