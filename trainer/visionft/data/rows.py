"""Fixed-budget rows: every training step's samples packed into one row of one fixed shape.

Why: a CUDA graph replays a step only when its inputs have the shapes it was captured with. Batches of
real data never repeat their shapes (image sides from 56 to 1,008 px, answers from 30 to 500 tokens),
so graphs keyed by batch shape are never reused. Here every row has the same budgets instead: a token
budget, a vision budget (patches, or images for a fixed-resolution tower) and caps on samples and
images. What varies between rows (where each sample starts, which tokens are image tokens, the vision
windows) travels as device tensors of fixed size, built by the architecture family's row layout
(``visionft.patching.rows``); one captured graph then serves every row of a tier.

How rows are filled (``RowPacker``): each optimizer step the Trainer hands over ``perDeviceBatchSize``
samples; they join a buffer, and a row is taken from the buffer: its oldest sample first (so no sample
waits long), then best fit (the largest sample that still fits every budget) until nothing fits.
Samples that did not fit stay for the next step. Because one batch goes in per row taken, a row holds
``perDeviceBatchSize`` samples on average, and an epoch is as many steps as without packing. The
budgets are sized (``plan_tiers``) so that a row can hold a little more than the average batch; the
buffer then stays short, and the unused share of the budgets (padding) is about the margin.

Tiers: a second, larger budget (tier 1) serves a row whose oldest sample does not fit tier 0, and rows
taken while the buffer holds a backlog (more than ``drain_after`` samples). Each tier is one graph
signature, so a run has at most two. A sample that fits neither (more images than the probed data
suggested) is not dropped: it gets a row of its own, of a budget grown to it (``RowTiers.overflow``).

``simulate`` replays the packer on sample sizes alone (no tensors), for choosing the margin and for
reporting padding and replay shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class SampleSize:
    """What one sample takes of a row.

    Attributes:
        tokens (int): its sequence length, image tokens included.
        patches (int): vision-tower units it needs (patches before merging; or images x tokens per
            image for a fixed-resolution tower).
        images (int): how many images it has.
    """

    tokens: int
    patches: int = 0
    images: int = 0


@dataclass(frozen=True)
class RowBudget:
    """The fixed shape of one tier of rows.

    Attributes:
        tokens (int): tokens per row (the sequence length every row is padded to).
        patches (int): vision units per row.
        images (int): at most this many images per row.
        samples (int): at most this many samples per row.
        max_sample_tokens (int): the longest sample any row may hold (an upper bound that the varlen
            attention kernels are launched with).
    """

    tokens: int
    patches: int
    images: int
    samples: int
    max_sample_tokens: int

    def fits(self, used: SampleSize, count: int, add: SampleSize) -> bool:
        return (
            count + 1 <= self.samples
            and used.tokens + add.tokens <= self.tokens
            and used.patches + add.patches <= self.patches
            and used.images + add.images <= self.images
            and add.tokens <= self.max_sample_tokens
        )


@dataclass(frozen=True)
class RowTiers:
    """The budgets of a run: tier 0 for most rows, tier 1 (larger) for the rest.

    Attributes:
        tiers (tuple[RowBudget, ...]): one or two budgets, smallest first.
        batch_size (int): samples handed over per step (``perDeviceBatchSize``).
        drain_after (int): a buffer holding more samples than this takes its next row from the
            largest tier.
    """

    tiers: tuple[RowBudget, ...]
    batch_size: int
    drain_after: int

    def largest(self) -> RowBudget:
        return self.tiers[-1]

    @property
    def overflow_tier(self) -> int:
        """The tier index of rows that hold one sample larger than every tier (``overflow``)."""
        return len(self.tiers)

    def overflow(self, size: SampleSize) -> RowBudget:
        """A budget for one sample that fits no tier (more images than the largest tier holds): the
        largest tier grown to the sample's vision units and images. Such rows are rare, each size is a
        signature of its own, and a signature seen once runs eagerly rather than being captured."""
        largest = self.largest()
        return RowBudget(
            tokens=max(largest.tokens, size.tokens),
            patches=max(largest.patches, size.patches),
            images=max(largest.images, size.images),
            samples=largest.samples,
            max_sample_tokens=largest.max_sample_tokens,
        )


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def plan_tiers(
    sizes: Sequence[SampleSize],
    batch_size: int,
    max_sample_tokens: int,
    margin: float = 0.08,
    token_multiple: int = 64,
    patch_multiple: int = 64,
    patches_per_image: int | None = None,
    max_sample_patches: int | None = None,
    drain_after: int | None = None,
) -> RowTiers:
    """Budgets for a run from the sizes of a sample of its data.

    Tier 0 holds ``batch_size`` average samples plus ``margin``; tier 1 also holds the largest
    sample the run can meet (``max_sample_tokens``) and the backlog rows. With a fixed-resolution
    tower (``patches_per_image`` given), the vision budget is a whole number of images: tier 0 takes
    the average batch's images without margin (a padded image costs a whole tower pass), tier 1 one
    image more.

    Args:
        sizes (Sequence[SampleSize]): sizes of samples drawn from the dataset (a few dozen or more).
        batch_size (int): ``perDeviceBatchSize``.
        max_sample_tokens (int): the longest sample the collator accepts (``maxSeqLength``).
        margin (float): room above the average batch, as a fraction. Default: 0.08
            (``bench/layout_choice.py`` measured the trade between padding and backlog).
        token_multiple (int): token budgets are rounded up to this. Default: 64.
        patch_multiple (int): patch budgets are rounded up to this. Default: 64.
        patches_per_image (int | None): vision units of one image for a fixed-resolution tower.
        max_sample_patches (int | None): the most vision units one sample can have (tier 1 holds it).
        drain_after (int | None): buffered samples above which rows come from tier 1. Default:
            ``4 * batch_size``.

    Raises:
        ValueError: no sizes, or a batch size below 1.
    """
    if not sizes:
        raise ValueError("plan_tiers needs the sizes of at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    n = len(sizes)
    mean_tokens = sum(s.tokens for s in sizes) / n
    mean_patches = sum(s.patches for s in sizes) / n
    mean_images = sum(s.images for s in sizes) / n
    most_images = max(s.images for s in sizes)
    most_patches = max(s.patches for s in sizes)
    samples = 4 * batch_size
    tokens0 = _round_up(max(batch_size * mean_tokens * (1 + margin), token_multiple), token_multiple)
    tokens1 = _round_up(max(tokens0 * (1 + margin), max_sample_tokens), token_multiple)
    if patches_per_image:
        images0 = max(1, round(batch_size * mean_images)) if mean_images else 0
        images1 = max(images0 + 1, most_images) if mean_images else 0
        patches0, patches1 = images0 * patches_per_image, images1 * patches_per_image
    else:
        patches0 = _round_up(max(batch_size * mean_patches * (1 + margin), 1), patch_multiple)
        # A sample's image tokens are at most its tokens, and each stands for merge**2 patches: tier 1
        # is sized by the largest sample seen and by the largest image budget the run's rows need.
        patches1 = _round_up(
            max(patches0 * (1 + margin), most_patches, max_sample_patches or 0), patch_multiple
        )
        images0 = images1 = samples * max(1, most_images)
    # No sample is longer than its row: the bound the kernels are launched with is the smaller one.
    tier0 = RowBudget(tokens0, patches0, images0, samples, min(max_sample_tokens, tokens0))
    tier1 = RowBudget(tokens1, patches1, images1, samples, min(max_sample_tokens, tokens1))
    return RowTiers((tier0, tier1), batch_size=batch_size, drain_after=drain_after or 4 * batch_size)


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    size: SampleSize
    age: int


@dataclass
class PackedRow(Generic[T]):
    """Samples chosen for one row, and the tier they fit.

    Attributes:
        items (list): the samples, in row order.
        sizes (list[SampleSize]): their sizes.
        tier (int): index into ``RowTiers.tiers``.
    """

    items: list[T]
    sizes: list[SampleSize]
    tier: int

    def used(self) -> SampleSize:
        return SampleSize(
            sum(s.tokens for s in self.sizes),
            sum(s.patches for s in self.sizes),
            sum(s.images for s in self.sizes),
        )


@dataclass
class RowPacker(Generic[T]):
    """Online best-fit packing of samples into fixed-budget rows (module docstring).

    Args:
        tiers (RowTiers): the budgets.
    """

    tiers: RowTiers
    _buffer: list[_Entry[T]] = field(default_factory=list)
    _clock: int = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, items: Iterable[tuple[T, SampleSize]]) -> None:
        """Adds samples to the buffer.

        Raises:
            ValueError: a sample is larger than the largest tier (it could never be trained).
        """
        largest = self.tiers.largest()
        for item, size in items:
            if not largest.fits(SampleSize(0, 0, 0), 0, size):
                raise ValueError(
                    f"a sample of {size.tokens} tokens, {size.patches} vision units and {size.images} images "
                    f"is larger than a row ({largest.tokens} tokens, {largest.patches} units, "
                    f"{largest.images} images, {largest.max_sample_tokens} tokens per sample)"
                )
            self._buffer.append(_Entry(item, size, self._clock))
            self._clock += 1

    def take(self) -> PackedRow[T] | None:
        """The next row (oldest sample first, then best fit), or None when the buffer is empty."""
        if not self._buffer:
            return None
        oldest = min(self._buffer, key=lambda e: e.age)
        tier = 0
        if len(self._buffer) > self.tiers.drain_after or not self.tiers.tiers[0].fits(
            SampleSize(0, 0, 0), 0, oldest.size
        ):
            tier = len(self.tiers.tiers) - 1
        budget = self.tiers.tiers[tier]
        chosen = [oldest]
        rest = [e for e in self._buffer if e is not oldest]
        used = oldest.size
        while True:
            best = None
            for e in rest:
                if budget.fits(used, len(chosen), e.size) and (
                    best is None or (e.size.tokens, -e.age) > (best.size.tokens, -best.age)
                ):
                    best = e
            if best is None:
                break
            chosen.append(best)
            rest = [e for e in rest if e is not best]
            used = SampleSize(
                used.tokens + best.size.tokens,
                used.patches + best.size.patches,
                used.images + best.size.images,
            )
        self._buffer = rest
        chosen.sort(key=lambda e: e.age)
        return PackedRow([e.item for e in chosen], [e.size for e in chosen], tier)


@dataclass
class PackingStats:
    """What ``simulate`` measured.

    Attributes:
        steps (int): rows taken (one per batch handed over).
        tier_counts (list[int]): rows per tier.
        token_fill (float): real tokens / token slots over all rows.
        patch_fill (float): real vision units / vision slots over all rows.
        samples_per_row (float): mean samples per row.
        max_wait (int): the most steps a sample waited in the buffer.
        left_over (int): samples still buffered after the last step.
    """

    steps: int
    tier_counts: list[int]
    token_fill: float
    patch_fill: float
    samples_per_row: float
    max_wait: int
    left_over: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tier_counts": self.tier_counts,
            "token_fill": round(self.token_fill, 4),
            "patch_fill": round(self.patch_fill, 4),
            "samples_per_row": round(self.samples_per_row, 3),
            "max_wait": self.max_wait,
            "left_over": self.left_over,
        }


def simulate(sizes: Sequence[SampleSize], tiers: RowTiers) -> PackingStats:
    """Runs ``RowPacker`` over ``sizes`` in order, one batch of ``tiers.batch_size`` per step."""
    packer: RowPacker[int] = RowPacker(tiers)
    b = tiers.batch_size
    real_tokens = real_patches = slot_tokens = slot_patches = rows = samples = 0
    counts = [0] * len(tiers.tiers)
    max_wait = 0
    for step, start in enumerate(range(0, len(sizes), b)):
        packer.add((start + i, s) for i, s in enumerate(sizes[start : start + b]))
        row = packer.take()
        if row is None:
            continue
        budget = tiers.tiers[row.tier]
        used = row.used()
        real_tokens += used.tokens
        real_patches += used.patches
        slot_tokens += budget.tokens
        slot_patches += budget.patches
        rows += 1
        samples += len(row.items)
        counts[row.tier] += 1
        max_wait = max(max_wait, max(step - i // b for i in row.items))
    return PackingStats(
        steps=rows,
        tier_counts=counts,
        token_fill=real_tokens / max(slot_tokens, 1),
        patch_fill=real_patches / max(slot_patches, 1),
        samples_per_row=samples / max(rows, 1),
        max_wait=max_wait,
        left_over=len(packer),
    )


__all__ = [
    "PackedRow",
    "PackingStats",
    "RowBudget",
    "RowPacker",
    "RowTiers",
    "SampleSize",
    "plan_tiers",
    "simulate",
]
