"""Attention within the segments of one flat sequence, as one SDPA call.

Both the vision tower's windows (``patching.vision_attention``) and the samples of a packed row
(``patching.packed_attention``) are segments of a flat ``(S, heads, head_dim)`` sequence given by
``cu_seqlens``, and attention must stay inside each segment. Rather than one call per segment, the
segments are gathered into a zero-padded ``(n_segments, heads, max_len, head_dim)`` block, attended
in one SDPA call and scattered back. Memory is ``n_segments * max_len`` per head, linear in the
sequence, never ``S x S``.

Padding sits at the right end of each segment. Non-causal attention masks the padded keys with a
``(n_segments, 1, 1, max_len)`` mask; causal attention needs no mask at all, because a real query at
position ``i`` only sees keys ``j <= i``, which are all real. Padded query rows produce finite values
that are never scattered back, so they get no gradient.

``pad_segments`` builds the gather/scatter indices on the device from host ints only (the number of
segments, the longest one and the total), so it makes no host-device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PaddedSegments:
    """Where each segment's tokens go in the padded block.

    Attributes:
        n (int): number of segments.
        max_len (int): the longest segment (the padded length).
        gather (torch.Tensor | None): ``(n, max_len)`` flat token index of each padded slot, ``S`` for
            padding (a zero row appended to the sequence); None when all segments have ``max_len``
            tokens (a plain view then does).
        valid (torch.Tensor | None): ``(n, max_len)`` bool, True on real tokens; None as ``gather``.
        scatter (torch.Tensor | None): ``(S,)`` index of each token in the flattened ``(n * max_len)``
            block; None as ``gather``.
    """

    n: int
    max_len: int
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    @property
    def equal(self) -> bool:
        return self.gather is None


def pad_segments(cu_seqlens: torch.Tensor, n: int, max_len: int, total: int) -> PaddedSegments:
    """The layout of ``cu_seqlens`` (``n + 1`` starts, the last one ``total``), sync-free.

    Args:
        cu_seqlens (torch.Tensor): segment starts and the total length, on the sequence's device.
        n (int): number of segments (``cu_seqlens.shape[0] - 1``).
        max_len (int): the longest segment.
        total (int): the sequence length ``S``.
    """
    if n * max_len == total:  # every segment is max_len long: lengths sum to total and none exceeds it
        return PaddedSegments(n, max_len)
    dev = cu_seqlens.device
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    slot = torch.arange(max_len, device=dev)
    valid = slot[None, :] < lengths[:, None]
    gather = torch.where(valid, starts[:, None] + slot[None, :], total)
    token = torch.arange(total, device=dev)
    segment = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    scatter = segment * max_len + (token - starts[segment])
    return PaddedSegments(n, max_len, gather, valid, scatter)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PaddedSegments,
    scale: float,
    causal: bool = False,
) -> torch.Tensor:
    """Attention of ``(S, Hq, D)`` q and ``(S, Hkv, D)`` k/v within each segment; ``(S, Hq, D)`` out.

    ``Hq`` may be a multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads key/value
    head ``h // (Hq // Hkv)``, as transformers' ``repeat_kv``).
    """
    seq, heads, dim = q.shape
    gqa = k.shape[1] != heads
    n, max_len = layout.n, layout.max_len
    if layout.equal:
        qs, ks, vs = (t.reshape(n, max_len, t.shape[1], dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(seq, heads, dim)
    assert layout.gather is not None and layout.valid is not None and layout.scatter is not None
    qs, ks, vs = (
        torch.cat((t, t.new_zeros(1, t.shape[1], dim)))[layout.gather].transpose(1, 2) for t in (q, k, v)
    )
    mask = None if causal else layout.valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, scale=scale, is_causal=causal, enable_gqa=gqa
    )
    return out.transpose(1, 2).reshape(n * max_len, heads, dim)[layout.scatter]


__all__ = ["PaddedSegments", "pad_segments", "segment_attention"]
