"""Rotary embedding kernels vs transformers' apply_rotary_pos_emb / apply_multimodal_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.rope import apply_mrope, apply_mrope_reference, apply_rope, apply_rope_reference

from tests.kernels.helpers import DEVICE, DTYPE_PARAMS, assert_rel_close, rand


def _cos_sin(positions: torch.Tensor, dim: int):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def _qk(b, hq, hk, s, d, dtype):
    # The layout Hugging Face passes: (B, S, H, D) memory viewed as (B, H, S, D).
    q = rand(b, s, hq, d, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = rand(b, s, hk, d, dtype=dtype).transpose(1, 2).requires_grad_(True)
    return q, k


def _check(out, ref, q, k, qr, kr, dtype):
    dq, dk = rand(*out[0].shape, dtype=dtype), rand(*out[1].shape, dtype=dtype)
    (out[0] * dq).sum().add((out[1] * dk).sum()).backward()
    (ref[0] * dq.float()).sum().add((ref[1] * dk.float()).sum()).backward()
    assert_rel_close(out[0], ref[0], dtype, name="q")
    assert_rel_close(out[1], ref[1], dtype, name="k")
    assert_rel_close(q.grad, qr.grad, dtype, name="dq")
    assert_rel_close(k.grad, kr.grad, dtype, name="dk")


@pytest.mark.parametrize(("b", "hq", "hk", "s", "d"), [(1, 4, 2, 16, 16), (3, 3, 1, 37, 8), (2, 7, 7, 5, 64)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_rope_matches_reference(b, hq, hk, s, d, dtype):
    torch.manual_seed(0)
    q, k = _qk(b, hq, hk, s, d, dtype)
    pos = torch.randint(0, 200, (b, s))
    cos, sin = _cos_sin(pos, d)
    out = apply_rope(q, k, cos.to(dtype), sin.to(dtype))
    qr, kr = (t.detach().float().requires_grad_(True) for t in (q, k))
    ref = apply_rope_reference(qr, kr, cos.to(dtype).float(), sin.to(dtype).float())
    _check(out, ref, q, k, qr, kr, dtype)


@pytest.mark.parametrize(
    ("b", "hq", "hk", "s", "d", "section"),
    [(1, 4, 2, 16, 16, [2, 3, 3]), (3, 3, 1, 37, 24, [4, 4, 4]), (2, 2, 2, 9, 128, [16, 24, 24])],
)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_mrope_matches_reference(b, hq, hk, s, d, section, dtype):
    torch.manual_seed(0)
    q, k = _qk(b, hq, hk, s, d, dtype)
    pos = torch.randint(0, 200, (3, b, s))  # distinct temporal/height/width positions
    cos, sin = _cos_sin(pos, d)
    out = apply_mrope(q, k, cos.to(dtype), sin.to(dtype), section)
    qr, kr = (t.detach().float().requires_grad_(True) for t in (q, k))
    ref = apply_mrope_reference(qr, kr, cos.to(dtype).float(), sin.to(dtype).float(), section)
    _check(out, ref, q, k, qr, kr, dtype)


def test_mrope_rejects_sections_that_do_not_cover_half_the_head():
    q, k = _qk(1, 2, 2, 4, 16, torch.float32)
    cos, sin = _cos_sin(torch.zeros(3, 1, 4), 16)
    with pytest.raises(ValueError, match="mrope_section"):
        apply_mrope(q, k, cos, sin, [2, 2, 2])


def test_mrope_matches_installed_transformers():
    """The reference itself agrees with the transformers release installed here."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    torch.manual_seed(0)
    q, k = _qk(1, 2, 2, 6, 16, torch.float32)
    pos = torch.randint(0, 50, (3, 1, 6))
    cos, sin = _cos_sin(pos, 16)
    ref = apply_mrope_reference(q, k, cos, sin, [2, 3, 3])
    if hasattr(m, "apply_multimodal_rotary_pos_emb"):
        hf = m.apply_multimodal_rotary_pos_emb(q, k, cos, sin, [2, 3, 3])
    else:  # transformers >= 5.2x: selection in the rotary module, plain application in attention
        rot = m.Qwen2_5_VLRotaryEmbedding.__new__(m.Qwen2_5_VLRotaryEmbedding)
        rot.mrope_section = [2, 3, 3]
        half = cos[..., :8]
        c, s_ = rot.recomposition_frequencies(half), rot.recomposition_frequencies(sin[..., :8])
        hf = m.apply_rotary_pos_emb(q, k, c, s_)
    torch.testing.assert_close(hf[0], ref[0])
    torch.testing.assert_close(hf[1], ref[1])
    assert DEVICE.type in ("cpu", "cuda")
