"""LoRA over a frozen NF4 base: output and gradients (x, A, B) vs autograd through the reference."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.lora_nf4 import lora_nf4_linear, lora_nf4_linear_reference
from visionft.kernels.nf4 import quantize_nf4_reference

from tests.kernels.helpers import DEVICE, DTYPE_PARAMS, assert_rel_close, rand


@pytest.mark.parametrize(("lead", "d_in", "d_out", "r"), [((2, 8), 64, 96, 8), ((3, 37), 128, 123 * 2, 4)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lora_nf4_matches_reference(lead, d_in, d_out, r, dtype, bias):
    torch.manual_seed(0)
    w = rand(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    packed, state = quantize_nf4_reference(w, nested=True)
    b = rand(d_out, dtype=dtype, scale=0.1) if bias else None
    x = rand(*lead, d_in, dtype=dtype, requires_grad=True)
    lora_a = rand(r, d_in, scale=d_in**-0.5, requires_grad=True)  # fp32 adapters, as PEFT keeps them
    lora_b = rand(d_out, r, scale=0.1, requires_grad=True)
    dy = rand(*lead, d_out, dtype=dtype)

    y = lora_nf4_linear(x, packed, state, b, lora_a, lora_b, 2.0)
    y.backward(dy)

    xr = x.detach().float().requires_grad_(True)
    ar, br = (t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b))
    state.dtype = torch.float32
    yr = lora_nf4_linear_reference(xr, packed, state, b.float() if bias else None, ar, br, 2.0)
    yr.backward(dy.float())

    assert y.dtype == dtype and lora_a.grad.dtype == torch.float32
    assert_rel_close(y, yr, dtype, factor=2, name="y")
    assert_rel_close(x.grad, xr.grad, dtype, factor=2, name="dx")
    assert_rel_close(lora_a.grad, ar.grad, dtype, factor=2, name="dA")
    assert_rel_close(lora_b.grad, br.grad, dtype, factor=2, name="dB")


def test_lora_nf4_frozen_adapter_gets_no_grad():
    torch.manual_seed(0)
    packed, state = quantize_nf4_reference(rand(32, 64), nested=False)
    x = rand(4, 64, requires_grad=True)
    a = rand(2, 64, requires_grad=True)
    b = rand(32, 2)  # frozen
    lora_nf4_linear(x, packed, state, None, a, b, 1.0).sum().backward()
    assert b.grad is None and a.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_lora_plain_base_matches_reference(dtype):
    torch.manual_seed(0)
    w = rand(48, 40, dtype=dtype, scale=0.2)
    b = rand(48, dtype=dtype, scale=0.1)
    x = rand(3, 7, 40, dtype=dtype, requires_grad=True)
    a = rand(4, 40, scale=0.2, requires_grad=True)
    lb = rand(48, 4, scale=0.2, requires_grad=True)
    y = lora_nf4_linear(x, w, None, b, a, lb, 0.5)
    y.backward(torch.ones_like(y))
    xr = x.detach().float().requires_grad_(True)
    ar, br = (t.detach().clone().requires_grad_(True) for t in (a, lb))
    yr = lora_nf4_linear_reference(xr, w.float(), None, b.float(), ar, br, 0.5)
    yr.backward(torch.ones_like(yr))
    assert_rel_close(y, yr, dtype, factor=2, name="y")
    assert_rel_close(x.grad, xr.grad, dtype, factor=2, name="dx")
    assert_rel_close(a.grad, ar.grad, dtype, factor=2, name="dA")
    assert_rel_close(lb.grad, br.grad, dtype, factor=2, name="dB")


def test_lora_under_autocast_runs_in_the_autocast_dtype():
    """An fp32 model under bf16 autocast (what the Trainer does with bf16=True on a CPU): the
    Function computes in bf16 like the autocast reference, instead of mixing bf16 and fp32 operands."""
    torch.manual_seed(0)
    w = rand(48, 40, scale=0.2)
    x = rand(3, 7, 40, requires_grad=True)
    a = rand(4, 40, scale=0.2, requires_grad=True)
    lb = rand(48, 4, scale=0.2, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lora_nf4_linear(x, w, None, None, a, lb, 0.5)
    y.float().sum().backward()
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, lb))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        yr = lora_nf4_linear_reference(xr, w, None, None, ar, br, 0.5)
    yr.float().sum().backward()
    assert y.dtype == yr.dtype == torch.bfloat16
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_rel_close(y, yr, torch.bfloat16, factor=2, name="y")
    assert_rel_close(x.grad, xr.grad, torch.bfloat16, factor=2, name="dx")
    assert_rel_close(a.grad, ar.grad, torch.bfloat16, factor=2, name="dA")
    assert_rel_close(lb.grad, br.grad, torch.bfloat16, factor=2, name="dB")
