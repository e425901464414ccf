"""Rotary position embeddings for q and k in one launch, including Qwen2-VL/2.5-VL M-RoPE.

Hugging Face applies ``q * cos + rotate_half(q) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.
Written per half (``x = [x1, x2]``, ``cos = [c1, c2]``, ``sin = [s1, s2]``)::

    y1 = x1 * c1 - x2 * s1          dx1 =  dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = -dy1 * s1 + dy2 * c2

so the backward is the same kernel with the roles of the sine halves swapped and negated.

M-RoPE (``apply_multimodal_rotary_pos_emb`` of Qwen2-VL/2.5-VL in transformers <= 5.17): ``cos`` and
``sin`` come as ``(3, B, S, D)`` (temporal, height, width positions) and ``mrope_section`` (e.g.
``[16, 24, 24]``, summing to ``D/2``) says which of the three streams each frequency column takes:
``cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section * 2, -1))], -1)``. The kernel reads
that selection through a per-column stream index instead of building the concatenated tensors.
(Later transformers releases do the selection inside the rotary-embedding module and call the
plain ``apply_rotary_pos_emb`` with ``(B, S, D)``; the same kernel serves both.)

Layout: q ``(B, Hq, S, D)`` and k ``(B, Hk, S, D)`` with any strides but a unit last stride (the
views Hugging Face passes after ``transpose(1, 2)`` are fine). One program per ``(b, s)`` handles all
heads of q and k, loading cos/sin once. Computed in fp32, stored in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    SEC,
    seq_len,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    sqo_b,
    sqo_h,
    sqo_s,
    sko_b,
    sko_h,
    sko_s,
    sc_m,
    sc_b,
    sc_s,
    n_qh,
    n_kh,
    half,
    MROPE: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    cbase = b * sc_b + s * sc_s
    if MROPE:
        sec = tl.load(SEC + d, mask=dmask, other=0).to(tl.int64)
        cbase = cbase + sec * sc_m
    c1 = tl.load(COS + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + half + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + half + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        a1 = s2
        a2 = -s1
    else:
        a1 = -s1
        a2 = s2
    c1 = c1[None, :]
    c2 = c2[None, :]
    a1 = a1[None, :]
    a2 = a2[None, :]

    hq = tl.arange(0, BLOCK_QH)
    qmask = (hq[:, None] < n_qh) & dmask[None, :]
    qp = Q + b * sq_b + s * sq_s + hq[:, None] * sq_h + d[None, :]
    q1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(qp + half, mask=qmask, other=0.0).to(tl.float32)
    qo = QO + b * sqo_b + s * sqo_s + hq[:, None] * sqo_h + d[None, :]
    tl.store(qo, (q1 * c1 + q2 * a1).to(QO.dtype.element_ty), mask=qmask)
    tl.store(qo + half, (q2 * c2 + q1 * a2).to(QO.dtype.element_ty), mask=qmask)

    hk = tl.arange(0, BLOCK_KH)
    kmask = (hk[:, None] < n_kh) & dmask[None, :]
    kp = K + b * sk_b + s * sk_s + hk[:, None] * sk_h + d[None, :]
    k1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(kp + half, mask=kmask, other=0.0).to(tl.float32)
    ko = KO + b * sko_b + s * sko_s + hk[:, None] * sko_h + d[None, :]
    tl.store(ko, (k1 * c1 + k2 * a1).to(KO.dtype.element_ty), mask=kmask)
    tl.store(ko + half, (k2 * c2 + k1 * a2).to(KO.dtype.element_ty), mask=kmask)


def mrope_stream_index(mrope_section, device) -> torch.Tensor:
    """Per frequency column (``D/2`` of them), the position stream (0, 1, 2) M-RoPE takes it from."""
    idx = [i % 3 for i, n in enumerate(mrope_section) for _ in range(int(n))]
    return torch.tensor(idx, dtype=torch.int32, device=device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_strides(cos: torch.Tensor, batch: int, seq: int, mrope: bool):
    """Strides (stream, batch, seq) of cos/sin after broadcasting to ``([3,] B, S, D)``."""
    if mrope:
        c = cos.expand(3, batch, seq, cos.shape[-1])
        return c.stride(0), c.stride(1), c.stride(2)
    c = cos.expand(batch, seq, cos.shape[-1])
    return 0, c.stride(0), c.stride(1)


def rope_launch(q, k, cos, sin, sec, backward: bool):
    """Launches the kernel once for q and k. Returns new ``(q_out, k_out)`` of q's and k's layout."""
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _unit_last(cos), _unit_last(sin)
    batch, n_qh, seq, dim = q.shape
    n_kh = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    mrope = sec is not None
    sc_m, sc_b, sc_s = _cos_strides(cos, batch, seq, mrope)
    if sin.stride() != cos.stride():
        sin = sin.expand_as(cos).contiguous()
        cos = cos.expand_as(sin).contiguous()
        sc_m, sc_b, sc_s = _cos_strides(cos, batch, seq, mrope)
    half = dim // 2
    if batch * seq > 0:
        _rope_kernel[(batch * seq,)](
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            sec if mrope else cos,
            seq,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo.stride(0),
            qo.stride(1),
            qo.stride(2),
            ko.stride(0),
            ko.stride(1),
            ko.stride(2),
            sc_m,
            sc_b,
            sc_s,
            n_qh,
            n_kh,
            half,
            MROPE=mrope,
            BACKWARD=backward,
            BLOCK_QH=triton.next_power_of_2(n_qh),
            BLOCK_KH=triton.next_power_of_2(n_kh),
            BLOCK_D=triton.next_power_of_2(half),
            num_warps=4 if n_qh * half <= 4096 else 8,
        )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """Rotary embedding of q and k (and M-RoPE when ``sec`` is given); cos/sin are constants.

    Matches ``apply_rotary_pos_emb`` / ``apply_multimodal_rotary_pos_emb`` of transformers with
    ``unsqueeze_dim=1``. Computed in fp32 and rounded once (HF rounds after each product in the
    input dtype, so bf16 results differ by an ulp or so).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, sec):
        qo, ko = rope_launch(q, k, cos, sin, sec, backward=False)
        ctx.save_for_backward(cos, sin, sec if sec is not None else cos.new_empty(0))
        ctx.mrope = sec is not None
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, sec = ctx.saved_tensors
        dqi, dki = rope_launch(dq, dk, cos, sin, sec if ctx.mrope else None, backward=True)
        return dqi, dki, None, None, None


def _check(q, k, cos, sec_len):
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, S, D) with even D")
    if cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"cos last dim {cos.shape[-1]} != head_dim {q.shape[-1]}")
    if sec_len is not None and sec_len != q.shape[-1] // 2:
        raise ValueError(f"mrope_section sums to {sec_len}, expected head_dim/2 = {q.shape[-1] // 2}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Fused ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``; cos/sin ``(B or 1, S, D)``."""
    _check(q, k, cos, None)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return RopeFunction.apply(q, k, cos, sin, None)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mrope_section):
    """Fused ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1)``.

    Args:
        q (torch.Tensor): ``(B, Hq, S, D)``.
        k (torch.Tensor): ``(B, Hk, S, D)``.
        cos (torch.Tensor): ``(3, B, S, D)`` per-stream cosines.
        sin (torch.Tensor): ``(3, B, S, D)`` per-stream sines.
        mrope_section (Sequence[int]): columns per stream, summing to ``D/2``.
    """
    _check(q, k, cos, sum(int(n) for n in mrope_section))
    sec = mrope_stream_index(mrope_section, q.device)
    return RopeFunction.apply(q, k, cos, sin, sec)


# --------------------------------------------------------------------------------------------------
# PyTorch references (transformers' functions, written out)
# --------------------------------------------------------------------------------------------------


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """``transformers`` ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_mrope_reference(q, k, cos, sin, mrope_section):
    """``transformers`` Qwen2-VL ``apply_multimodal_rotary_pos_emb(..., unsqueeze_dim=1)``."""
    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return apply_rope_reference(q, k, cos, sin)
