"""Fused linear + cross-entropy vs full logits + F.cross_entropy, with ignored labels."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

from tests.kernels.helpers import DEVICE, DTYPE_PARAMS, assert_rel_close, rand


def _labels(n, vocab, ignore_frac, gen):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return labels.to(DEVICE)


@pytest.mark.parametrize(
    ("n", "hidden", "vocab", "chunk"), [(32, 64, 128, None), (111, 37, 123, 16), (20, 48, 1500, 7)]
)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_linear_ce_matches_reference(n, hidden, vocab, chunk, dtype, bias):
    gen = torch.Generator().manual_seed(0)
    h = rand(n, hidden, dtype=dtype, requires_grad=True, gen=gen)
    w = rand(vocab, hidden, dtype=dtype, scale=hidden**-0.5, requires_grad=True, gen=gen)
    b = rand(vocab, dtype=dtype, scale=0.1, requires_grad=True, gen=gen) if bias else None
    labels = _labels(n, vocab, 0.4, gen)

    loss = fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=chunk)
    (loss * 1.7).backward()

    hr, wr = (t.detach().float().requires_grad_(True) for t in (h, w))
    br = b.detach().float().requires_grad_(True) if bias else None
    ref = fused_linear_cross_entropy_reference(hr, wr, labels, bias=br)
    (ref * 1.7).backward()

    assert_rel_close(loss, ref, dtype, name="loss")
    assert_rel_close(h.grad, hr.grad, dtype, factor=2, name="dh")
    assert_rel_close(w.grad, wr.grad, dtype, factor=2, name="dw")
    if bias:
        assert_rel_close(b.grad, br.grad, dtype, factor=2, name="db")


@pytest.mark.parametrize("reduction", ["sum", "num_items"])
def test_fused_linear_ce_reductions(reduction):
    gen = torch.Generator().manual_seed(1)
    h = rand(3, 13, 32, requires_grad=True, gen=gen)
    w = rand(50, 32, scale=0.2, gen=gen)  # frozen weight: only d hidden
    labels = _labels(39, 50, 0.3, gen).view(3, 13)
    kw = {"reduction": "sum"} if reduction == "sum" else {"num_items_in_batch": 11}
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=8, **kw)
    loss.backward()
    hr = h.detach().clone().requires_grad_(True)
    ref = fused_linear_cross_entropy_reference(hr, w, labels, **kw)
    ref.backward()
    assert_rel_close(loss, ref, torch.float32, name="loss")
    assert_rel_close(h.grad, hr.grad, torch.float32, name="dh")
    assert w.grad is None


def test_fused_linear_ce_all_ignored_gives_zero_loss_and_grad():
    h = rand(5, 16, requires_grad=True)
    w = rand(40, 16)
    loss = fused_linear_cross_entropy(h, w, torch.full((5,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max().item() == 0.0


def test_fused_linear_ce_under_autocast_matches_the_autocast_reference():
    """fp32 weights under bf16 autocast (the Trainer's bf16=True on a CPU): logits in bf16 like
    autocast's lm_head, no mixing of bf16 and fp32 operands in the chunk loop."""
    torch.manual_seed(0)
    h = rand(20, 32, requires_grad=True)
    w = rand(50, 32, scale=0.2, requires_grad=True)
    labels = torch.randint(0, 50, (20,), device=DEVICE)
    labels[::5] = -100
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    hr, wr = (t.detach().clone().requires_grad_(True) for t in (h, w))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref = fused_linear_cross_entropy_reference(hr, wr, labels)
    ref.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert_rel_close(loss, ref, torch.bfloat16, factor=2, name="loss")
    assert_rel_close(h.grad, hr.grad, torch.bfloat16, factor=2, name="dh")
    assert_rel_close(w.grad, wr.grad, torch.bfloat16, factor=2, name="dw")
