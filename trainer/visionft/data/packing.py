"""The packed-row format: several samples concatenated into one row of batch size 1, without padding.

A packed batch is what ``VisionDataCollator(..., packing=True)`` returns. Next to the usual model
inputs (``input_ids``, ``labels``, ``mm_token_type_ids`` and an all-ones ``attention_mask`` of shape
``(1, total)``; ``pixel_values`` and ``image_grid_thw`` of all images, in order) it carries the
segment layout under two keys:

- ``packed_cu_seqlens``: int32 tensor ``(n_samples + 1,)``, the start of every sample in the row and
  the row's length last (``[0, len_0, len_0 + len_1, ...]``). It travels to the device with the
  other tensors.
- ``packed_max_seqlen``: a Python int, the longest sample. Kernels need it on the host, and reading it
  from the device tensor would be a host-device sync inside the forward (which a CUDA graph refuses).

Both names are new to transformers on purpose. The model's forward passes its unknown keyword
arguments to the text attention, which is what ``visionft.patching.packed_attention`` reads. It also
passes them to the vision tower's attention, which itself calls the attention function with
``cu_seq_lens_q=``; a batch key of that name would arrive twice there ("got multiple values").

Labels: the first token of every sample after the first is -100. The loss predicts token ``t + 1``
from position ``t``, so without this the last token of one sample would be trained to predict the
first token of the next.

Positions need no per-sample work: Qwen's ``get_rope_index`` over a packed row numbers each sample as
it would alone, plus one offset (the running position where the sample starts) that is the same on
the temporal, height and width axes; rotary attention depends only on position differences within a
sample, so the offset cancels under block-diagonal attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Batch key of the segment starts (device tensor, int32, ``(n_samples + 1,)``).
PACKED_CU_SEQLENS = "packed_cu_seqlens"
#: Batch key of the longest segment (host int).
PACKED_MAX_SEQLEN = "packed_max_seqlen"

#: Set (to True) on a forward that keeps the samples of a packed row apart:
#: ``visionft.patching.packed_attention`` marks its text-attention forwards so.
SEPARATES_PACKED_SAMPLES = "separates_packed_samples"

IGNORE_INDEX = -100


def separates_packed_samples(model) -> bool:
    """Whether ``model`` (or its PEFT wrapper) has a forward that keeps a packed row's samples apart.

    Without one, each sample of a packed row would attend to the samples before it: the row needs
    ``visionft.patching.enable_packing(model)`` first.
    """
    for module in model.modules():
        function = getattr(module.forward, "__func__", module.forward)
        if getattr(function, SEPARATES_PACKED_SAMPLES, False):
            return True
    return False


def segment_layout(lengths: Sequence[int]) -> dict[str, torch.Tensor | int]:
    """The two layout keys for samples of ``lengths`` tokens, in row order."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + int(length))
    return {
        PACKED_CU_SEQLENS: torch.tensor(starts, dtype=torch.int32),
        PACKED_MAX_SEQLEN: max((int(x) for x in lengths), default=0),
    }


def mask_sample_starts(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``labels`` (1, total) with -100 on the first token of every sample but the first (in place)."""
    starts = cu_seqlens[1:-1].long()
    labels[0, starts] = IGNORE_INDEX
    return labels


__all__ = [
    "PACKED_CU_SEQLENS",
    "PACKED_MAX_SEQLEN",
    "SEPARATES_PACKED_SAMPLES",
    "mask_sample_starts",
    "segment_layout",
    "separates_packed_samples",
]
