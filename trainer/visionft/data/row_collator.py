"""``RowCollator``: the Trainer's batches of samples in, fixed-shape rows out (``visionft.data.rows``).

Each call encodes the batch's records with ``VisionDataCollator`` (its image rules, templates, labels
and bad-sample handling), adds them to a ``RowPacker``, and returns the next row, assembled by the
architecture family's row layout (``visionft.patching.rows``) into host tensors of the row's tier.
Samples that did not fit this row wait in the packer for the next one, so a row holds
``perDeviceBatchSize`` samples on average and an epoch has as many steps as without packing.

A sample larger than the largest tier (more images than a row of a fixed-resolution tower holds, seen
where the probe of the dataset saw none so large) is trained all the same: it waits in a queue of its
own and gets a row to itself, of a budget grown to it (``RowTiers.overflow``), one such row per call.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import torch

from visionft.data.errors import BadSampleError
from visionft.data.rows import RowPacker, RowTiers, SampleSize, plan_tiers

logger = logging.getLogger(__name__)


class RowCollator:
    """Collates the Trainer's batches into fixed-shape rows (module docstring).

    Args:
        collator (VisionDataCollator): encodes records (and counts bad samples).
        family: the row family (``visionft.patching.rows``): ``sample_size`` and ``assemble``.
        tiers (RowTiers): the row budgets.
        pin (bool): put the row's tensors in pinned host memory (CUDA only). Default: True.
        prepare (Callable[[dict], dict] | None): applied to each assembled row (on the host), e.g. the
            family's ``host_inputs`` bound to the model. Default: None.

    The fill of the rows that were trained is counted by the consumer from each row's ``RowInfo``
    (``RowStats``): rows built ahead and never trained do not count.
    """

    def __init__(
        self, collator: Any, family: Any, tiers: RowTiers, pin: bool = True, prepare: Any = None
    ) -> None:
        self.collator = collator
        self.prepare = prepare
        self.family = family
        self.tiers = tiers
        self.packer: RowPacker = RowPacker(tiers)
        #: Samples larger than every tier, each to be trained in a row of its own.
        self.oversize: list[tuple[dict, SampleSize]] = []
        self.pin = pin

    def __getattr__(self, name: str) -> Any:
        # Everything else (tokenizer, max_seq_length, ...) is the sample collator's.
        return getattr(self.__dict__["collator"], name)

    # The bad-sample counts are the collator's (visionft.data.prefetch keeps them exact).
    @property
    def skipped(self) -> int:
        return self.collator.skipped

    @property
    def substituted(self) -> int:
        return self.collator.substituted

    @property
    def last_skip_reasons(self) -> list[str]:
        return self.collator.last_skip_reasons

    def uncount(self, skipped: int, substituted: int = 0) -> None:
        self.collator.uncount(skipped, substituted)

    def prompt_inputs(self, record: dict, index: int | None = None):
        return self.collator.prompt_inputs(record, index)

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        encoded = self.collator.encode_batch(features)
        largest = self.tiers.largest()
        fitting = []
        for sample in encoded:
            size = self.family.sample_size(sample)
            if largest.fits(SampleSize(0, 0, 0), 0, size):
                fitting.append((sample, size))
            else:
                self.oversize.append((sample, size))
        self.packer.add(fitting)
        if self.oversize:
            sample, size = self.oversize.pop(0)
            tier = self.tiers.overflow_tier
            logger.info(
                "visionft: a sample of %d images and %d tokens fits no packed row (at most %d images); it "
                "trains in a row of its own",
                size.images,
                size.tokens,
                largest.images,
            )
            batch = self.family.assemble([sample], self.tiers.overflow(size), tier)
        else:
            row = self.packer.take()
            if row is None:  # every sample of the batch was bad: stand in with the last good one
                last = self.collator._last_good
                self.packer.add([(last, self.family.sample_size(last))])
                row = self.packer.take()
            assert row is not None
            batch = self.family.assemble(row.items, self.tiers.tiers[row.tier], row.tier)
        if self.prepare is not None:
            batch = self.prepare(batch)
        if self.pin:
            batch = _pinned(batch)
        return batch


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors in pinned host memory (when CUDA is there), for asynchronous copies."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class RowStats:
    """What the trained rows held: rows per tier, samples, and the share of each budget filled."""

    def __init__(self, tiers: RowTiers) -> None:
        self.tiers = tiers
        self.tier_rows = [0] * len(tiers.tiers)
        self.overflow_rows = 0
        self.samples = self.real_tokens = self.slot_tokens = self.real_patches = self.slot_patches = 0

    def add(self, info: Any) -> None:
        """Counts one trained row (its ``RowInfo``)."""
        if info.tier < len(self.tier_rows):
            self.tier_rows[info.tier] += 1
        else:
            self.overflow_rows += 1
        self.samples += info.samples
        self.real_tokens += info.real_tokens
        self.slot_tokens += info.budget.tokens
        self.real_patches += info.real_patches
        self.slot_patches += info.budget.patches

    def summary(self) -> dict[str, Any]:
        rows = sum(self.tier_rows) + self.overflow_rows
        return {
            "rows": rows,
            "tier_rows": list(self.tier_rows),
            "overflow_rows": self.overflow_rows,
            "samples_per_row": round(self.samples / max(rows, 1), 3),
            "token_fill": round(self.real_tokens / max(self.slot_tokens, 1), 4),
            "patch_fill": round(self.real_patches / max(self.slot_patches, 1), 4),
            "budgets": [
                {"tokens": t.tokens, "patches": t.patches, "images": t.images, "samples": t.samples}
                for t in self.tiers.tiers
            ],
        }


def probe_sizes(
    collator: Any, family: Any, dataset: Any, n: int = 256, seed: int = 0, threads: int | None = None
) -> list[SampleSize]:
    """Sizes of up to ``n`` random records of ``dataset``, encoded as training encodes them (bad ones
    left out), for ``plan_tiers``. Encoded by a pool of threads (image decoding and the processor's
    array work release the GIL), so that sizing the rows adds seconds, not minutes, before the first
    step."""
    from concurrent.futures import ThreadPoolExecutor

    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)

    def size(i: int) -> SampleSize | None:
        try:
            return family.sample_size(collator.encode(dataset[i], index=i))
        except BadSampleError:
            return None

    workers = threads or min(8, os.cpu_count() or 1)
    found: list[SampleSize] = []
    at = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while len(found) < n and at < min(len(indices), 4 * n):  # bad samples: draw a few more
            chunk = indices[at : at + n - len(found)]
            at += len(chunk)
            found += [s for s in pool.map(size, chunk) if s is not None]
    if not found:
        raise BadSampleError("no sample of the dataset could be encoded to size the packed rows")
    return found


def plan_rows(
    collator: Any, family: Any, dataset: Any, batch_size: int, probe: int = 256, **kwargs
) -> RowTiers:
    """The row budgets for ``dataset`` (``plan_tiers`` over ``probe_sizes``)."""
    sizes = probe_sizes(collator, family, dataset, probe)
    bounds = family.plan_kwargs(collator.max_seq_length)
    tiers = plan_tiers(sizes, batch_size, max_sample_tokens=collator.max_seq_length, **{**bounds, **kwargs})
    logger.info(
        "visionft: packed rows from %d probed samples: %s",
        len(sizes),
        ", ".join(
            f"tier {i}: {t.tokens} tokens, {t.patches} vision units, {t.images} images"
            for i, t in enumerate(tiers.tiers)
        ),
    )
    return tiers


__all__ = ["RowCollator", "RowStats", "plan_rows", "probe_sizes"]
