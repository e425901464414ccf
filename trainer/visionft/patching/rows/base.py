"""What every architecture family's fixed-shape row layout provides, and the pieces they share.

A family turns the samples that ``visionft.data.rows.RowPacker`` chose for a row into one batch of
fixed shapes (``assemble``, on the host, in the data loader's thread), and runs forward + loss on such
a batch with the model's own modules (``forward``), without any host-device sync and without any
shape that depends on the data, so that ``visionft.engine.cuda_graphs`` captures it once per tier.

A row batch is a plain dict: model-sized tensors (``input_ids``, ``labels``, ``shift_labels``,
``attention_mask`` marking real tokens, and the family's layout tensors) plus ``ROW_KEY``, a
``RowInfo`` with the host ints the kernels are launched with. Everything in ``RowInfo.signature`` is
equal for all rows of one tier.

Shared here: the text segments (samples, then the padding cut into chunks no longer than a sample may
be, then empty segments up to a fixed count), the attention over segments (flash varlen on CUDA in
bf16/fp16, padded-segment SDPA elsewhere), the image-feature scatter with a trash row, and the loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from visionft.data.rows import RowBudget, SampleSize
from visionft.patching.core import PatchReport, kernels_can_run
from visionft.patching.packed_attention import _varlen, attention_operands
from visionft.patching.segments import PaddedSegments, pad_segments, segment_attention

#: Batch key of the ``RowInfo`` of a row batch.
ROW_KEY = "visionft_row"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RowInfo:
    """The host side of a row batch.

    Attributes:
        family (str): the family's name (its table key).
        tier (int): which budget the row fills.
        budget (RowBudget): that budget.
        ints (tuple[tuple[str, int], ...]): host ints the forward needs (segment bounds, counts).
        samples (int): samples in the row.
        real_tokens (int): tokens that are not padding.
        real_patches (int): vision units that are not padding.
    """

    family: str
    tier: int
    budget: RowBudget
    ints: tuple[tuple[str, int], ...]
    samples: int = 0
    real_tokens: int = 0
    real_patches: int = 0

    @property
    def signature(self) -> tuple:
        return (self.family, self.tier, self.budget, self.ints)

    def int(self, name: str) -> int:
        return dict(self.ints)[name]


class RowFamily(Protocol):
    """One architecture family's row layout (module docstring)."""

    name: str

    def sample_size(self, sample: dict[str, torch.Tensor]) -> SampleSize: ...

    def assemble(self, samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, tier: int) -> dict: ...

    def forward(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], info: RowInfo, num_items: Any = None
    ) -> torch.Tensor: ...


@dataclass
class TextRow:
    """The text part of a row, host tensors of one fixed length.

    Attributes:
        input_ids, labels, shift_labels, attention_mask (torch.Tensor): ``(1, T)``.
        cu_seqlens (torch.Tensor): ``(segments + 1,)`` int32 segment starts (samples, padding chunks,
            then empty segments), the last ``T``.
        starts (list[int]): where each sample starts in the row.
        real (int): tokens that belong to samples.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    shift_labels: torch.Tensor
    attention_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    starts: list[int] = field(default_factory=list)
    real: int = 0


def text_segments(budget: RowBudget) -> int:
    """Segments of every row of ``budget``: the sample cap plus the padding chunks it may need."""
    return budget.samples + -(-budget.tokens // budget.max_sample_tokens) + 1


def padded_cu_seqlens(lengths: Sequence[int], total: int, chunk: int, segments: int) -> torch.Tensor:
    """Segment starts for ``lengths`` followed by the padding ``total - sum`` in chunks of at most
    ``chunk``, then empty segments, ``segments + 1`` entries in all (int32)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + int(n))
    rest = total - starts[-1]
    if rest < 0:
        raise ValueError(f"the samples take {starts[-1]} slots, over the row's {total}")
    while rest > 0:
        step = min(chunk, rest)
        starts.append(starts[-1] + step)
        rest -= step
    if len(starts) > segments + 1:
        raise ValueError(f"{len(starts) - 1} segments do not fit the row's {segments}")
    starts += [total] * (segments + 1 - len(starts))
    return torch.tensor(starts, dtype=torch.int32)


def text_row(samples: Sequence[dict[str, torch.Tensor]], budget: RowBudget, pad_id: int) -> TextRow:
    """Concatenates the samples' ``input_ids`` and ``labels`` and pads them to ``budget.tokens``.

    The first label of every sample is ignored (the token before it belongs to another sample), and
    ``shift_labels`` is ``labels`` moved one to the left (what position ``t`` predicts).
    """
    total = budget.tokens
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    labels = torch.full((1, total), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((1, total), dtype=torch.long)
    starts, at = [], 0
    for sample in samples:
        n = int(sample["input_ids"].shape[1])
        ids[0, at : at + n] = sample["input_ids"][0]
        labels[0, at : at + n] = sample["labels"][0]
        labels[0, at] = IGNORE_INDEX
        mask[0, at : at + n] = 1
        starts.append(at)
        at += n
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[0, :-1] = labels[0, 1:]
    lengths = [int(s["input_ids"].shape[1]) for s in samples]
    cu = padded_cu_seqlens(lengths, total, budget.max_sample_tokens, text_segments(budget))
    return TextRow(ids, labels, shift, mask, cu, starts, at)


# --------------------------------------------------------------------------------------------------
# Attention over segments
# --------------------------------------------------------------------------------------------------


def _padded_layout(cu_seqlens: torch.Tensor, max_len: int, total: int) -> PaddedSegments:
    layout = pad_segments(cu_seqlens, int(cu_seqlens.shape[0]) - 1, max_len, total)
    if layout.valid is None:
        return layout
    # An empty segment would mask every key of its padded slots (NaN in SDPA's softmax): let its first
    # slot see the zero row instead. Real segments already see their first token.
    valid = layout.valid | (torch.arange(max_len, device=layout.valid.device) == 0)[None, :]
    return PaddedSegments(layout.n, layout.max_len, layout.gather, valid, layout.scatter)


def segments_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Attention of ``(S, Hq, D)`` q and ``(S, Hkv, D)`` k/v within each segment of ``cu_seqlens``
    (empty segments allowed); ``(S, Hq, D)`` out. ``max_len`` bounds every segment (a host int)."""
    q, k, v = attention_operands(q, k, v)
    found = _varlen()
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and found is not None:
        varlen_attn, params = found
        kwargs: dict = {}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if "scale" in params:
            kwargs["scale"] = scale
        elif abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:
            q = q * (scale * q.shape[-1] ** 0.5)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kwargs)
    layout = _padded_layout(cu_seqlens.to(q.device), max_len, q.shape[0])
    return segment_attention(q, k, v, layout, scale, causal=causal)


# --------------------------------------------------------------------------------------------------
# Image features into the text, and the loss
# --------------------------------------------------------------------------------------------------


def scatter_features(embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``embeds`` ``(1, T, D)`` with ``features`` ``(N, D)`` written at ``positions`` ``(N,)``; a
    position of ``T`` is the trash row (padding features), dropped afterwards."""
    total, width = embeds.shape[1], embeds.shape[2]
    flat = torch.cat((embeds.reshape(total, width), embeds.new_zeros(1, width)))
    flat = flat.index_copy(0, positions, features.reshape(-1, width).to(flat.dtype))
    return flat[:total].unsqueeze(0)


def row_batch(
    family: str,
    text: TextRow,
    tensors: dict[str, torch.Tensor],
    *,
    budget: RowBudget,
    tier: int,
    ints: dict[str, int],
    samples: int,
    real_patches: int,
) -> dict[str, Any]:
    """A row batch: the text row's tensors, the family's own ``tensors`` (positions, layout, pixels) and
    the ``RowInfo`` under ``ROW_KEY``."""
    return {
        "input_ids": text.input_ids,
        "labels": text.labels,
        "shift_labels": text.shift_labels,
        "attention_mask": text.attention_mask,
        **tensors,
        ROW_KEY: RowInfo(
            family=family,
            tier=tier,
            budget=budget,
            ints=tuple(sorted(ints.items())),
            samples=samples,
            real_tokens=text.real,
            real_patches=real_patches,
        ),
    }


def embed_on_host(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with ``inputs_embeds`` (pinned) when ``model``'s input-embedding table lives in host
    memory (the offload patch), so that the lookup happens on the host-built row rather than inside a
    captured forward; ``batch`` itself otherwise. A row forward uses ``inputs_embeds`` when the batch has
    it. ``model``: the HF model or its PEFT wrapper."""
    from visionft.patching import hf_model

    if "inputs_embeds" in batch:
        return batch
    embedding = hf_model(model).get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or weight.device.type != "cpu" or not torch.cuda.is_available():
        return batch
    with torch.no_grad():
        ids = batch["input_ids"].to("cpu")  # already there when called on the host-built row
        rows = F.embedding(ids, weight, getattr(embedding, "padding_idx", None))
    return {**batch, "inputs_embeds": rows.pin_memory()}


def segment_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``(1, total)`` positions counting from 0 in each segment of ``cu_seqlens`` (samples, then padding
    chunks), as each sample alone would have them."""
    positions = torch.zeros((1, total), dtype=torch.long)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        positions[0, start:end] = torch.arange(end - start)
    return positions


def image_positions(text: TextRow, image_token_id: int, units: int, real: int) -> torch.Tensor:
    """Where each of the row's ``units`` image-feature slots goes in the text: the ``real`` image tokens
    in order, then the trash row ``T`` for the padding slots (``scatter_features``).

    Raises:
        ValueError: the row's image tokens are not ``real`` many (text and images disagree).
    """
    at = (text.input_ids[0] == image_token_id).nonzero().reshape(-1)
    if int(at.shape[0]) != real:
        raise ValueError(f"rows: {int(at.shape[0])} image tokens for {real} image features in the row")
    out = torch.full((units,), text.input_ids.shape[1], dtype=torch.long)
    out[:real] = at
    return out


def row_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    shift_labels: torch.Tensor,
    num_items: Any = None,
    fused: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``shift_labels``: the sum over supervised tokens divided
    by ``num_items`` (the Trainer's count over all micro-batches) or, without it, by the row's count.
    With ``fused`` (the optimizations on), one chunked kernel that keeps no logits, where the kernels
    run and ``head`` is a plain ``nn.Linear``."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    weight = getattr(head, "weight", None)
    if fused and type(head) is nn.Linear and weight is not None and kernels_can_run(hidden.device):
        from visionft.kernels.fused_linear_ce import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden, weight, labels, bias=head.bias, ignore_index=IGNORE_INDEX, num_items_in_batch=num_items
        )
    logits = head(hidden).float()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is None:
        denom = (labels != IGNORE_INDEX).sum().clamp(min=1).to(total.dtype)
    else:
        denom = torch.as_tensor(num_items, device=total.device).to(total.dtype)
    return total / denom


def install_once(
    report: PatchReport, module: nn.Module, make: Callable[[Callable], Callable], kind: str
) -> None:
    """Wraps ``module.forward`` with ``make(current_forward)`` unless this kind already did."""
    import types

    mark = f"_visionft_{kind}"
    current = module.forward
    if getattr(getattr(current, "__func__", None), mark, False):
        return
    forward = make(current)
    setattr(forward, mark, True)
    report.swap(module, "forward", types.MethodType(forward, module), kind)


__all__ = [
    "IGNORE_INDEX",
    "ROW_KEY",
    "RowFamily",
    "RowInfo",
    "TextRow",
    "embed_on_host",
    "image_positions",
    "install_once",
    "padded_cu_seqlens",
    "row_batch",
    "row_loss",
    "scatter_features",
    "segment_positions",
    "segments_attention",
    "text_row",
    "text_segments",
]
