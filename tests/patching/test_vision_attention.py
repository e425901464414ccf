"""Windowed vision attention in one SDPA call vs transformers' one call per window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from visionft.patching.vision_attention import windowed_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _per_window(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qw, kw, vw = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qw, kw, vw, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[16, 16, 16], [64], [5, 16, 1, 9], [7]])
def test_windowed_attention_matches_per_window_sdpa(lengths):
    torch.manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    seq, heads, dim = sum(lengths), 3, 8
    q, k, v = (torch.randn(seq, heads, dim, device=DEVICE, requires_grad=True) for _ in range(3))
    out = windowed_attention(q, k, v, cu, dim**-0.5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = _per_window(q, k, v, cu, dim**-0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
