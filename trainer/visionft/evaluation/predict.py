"""Running the model on held-out samples: generated answers, and the teacher-forced loss.

Both put the model in eval mode and restore its mode afterwards, run without gradients, and leave the
training RNG untouched (sampling draws from a forked RNG seeded by the run's seed), so an evaluation in the
middle of training changes nothing about the steps after it. Under data parallelism every rank takes every
``world``-th sample and the results are gathered, so the ranks stay in step and share the work.

Answers are generated one sample at a time: the prompt goes through ``VisionDataCollator.prompt_inputs``,
the same rendering, image rules and resizing as training, so every supported architecture works without
padding rules of its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from visionft_api.evaluation import GenerationSettings

from visionft.data.errors import BadSampleError
from visionft.engine import distributed
from visionft.evaluation.heldout import HeldOutSample

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _shard(count: int) -> range:
    return range(distributed.rank(), count, distributed.world_size())


def _gather(local: dict[int, Any]) -> dict[int, Any]:
    """Every rank's ``{sample index: result}`` merged (all ranks get the whole)."""
    if not distributed.is_distributed():
        return local
    parts: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def generate_answers(
    model, collator, samples: Sequence[HeldOutSample], generation: GenerationSettings, seed: int
) -> list[str]:
    """The model's answer to each sample, decoded without special tokens.

    Args:
        model: the model (PEFT-wrapped or not, not DDP-wrapped).
        collator (VisionDataCollator): builds the prompts.
        samples (Sequence[HeldOutSample]): what to answer.
        generation (GenerationSettings): length and decoding (temperature 0: greedy).
        seed (int): seeds sampling (unused for greedy decoding).

    Returns:
        list[str]: one answer per sample, in order; a sample whose prompt can't be built (a bad image
        under ``onBadSample: skip``) gets an empty answer, and a warning says so.
    """
    device = next(model.parameters()).device
    sampling = generation.temperature > 0
    options: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": generation.max_new_tokens}
    if sampling:
        options.update(temperature=generation.temperature, top_p=generation.top_p)
    else:
        # Greedy: no sampling knobs, so the generation config's defaults don't warn about them.
        options.update(temperature=None, top_p=None, top_k=None)
    answers: dict[int, str] = {}
    devices = [device] if device.type == "cuda" else []
    with _eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in _shard(len(samples)):
            sample = samples[i]
            try:
                inputs, _ = collator.prompt_inputs(sample.record, index=sample.index)
            except BadSampleError as err:
                logger.warning("no answer for held-out sample %d: %s", sample.index, err)
                answers[i] = ""
                continue
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = model.generate(**inputs, use_cache=True, pad_token_id=collator.pad_token_id, **options)
            prompt_length = inputs["input_ids"].shape[1]
            answers[i] = collator.tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True)
    merged = _gather(answers)
    return [merged[i] for i in range(len(samples))]


def eval_loss(model, collator, samples: Sequence[HeldOutSample], batch_size: int) -> float | None:
    """The mean teacher-forced loss per supervised token over ``samples``, in batches as training builds
    them (``batch_size`` samples each, ``VisionDataCollator.held_out_batch``: a bad sample is left out and
    warned about, without touching the training run's counts); None when no sample could be encoded."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)  # (loss x tokens, tokens)
    indices = list(_shard(len(samples)))
    with _eval_mode(model):
        for start in range(0, len(indices), batch_size):
            records = [samples[i].record for i in indices[start : start + batch_size]]
            batch, reasons = collator.held_out_batch(records)
            for reason in reasons:
                logger.warning("held-out sample left out of the evaluation loss: %s", reason)
            if batch is None:
                continue
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            tokens = int((batch["labels"][..., 1:] != -100).sum())
            if tokens == 0:
                continue
            loss = model(**batch).loss
            total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    if distributed.is_distributed():
        summed = total.to(distributed.device())
        torch.distributed.all_reduce(summed)
        total = summed.cpu()
    return float(total[0] / total[1]) if total[1] > 0 else None
