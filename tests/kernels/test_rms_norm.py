"""RMSNorm kernel vs the Hugging Face formulas (Qwen/Llama casting, Gemma's (1 + w))."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.rms_norm import rms_norm, rms_norm_reference

from tests.kernels.helpers import DEVICE, DTYPE_PARAMS, assert_rel_close, rand

SHAPES = [(2, 8, 64), (3, 37, 123), (1, 5, 257)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize(("mode", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_rms_norm_matches_reference(shape, dtype, mode, offset):
    torch.manual_seed(0)
    x = rand(*shape, dtype=dtype, requires_grad=True)
    w = (rand(shape[-1], scale=0.1) + (0.0 if offset else 1.0)).to(dtype).requires_grad_(True)
    dy = rand(*shape, dtype=dtype)

    y = rms_norm(x, w, eps=1e-6, offset=offset, mode=mode)
    y.backward(dy)

    xr = x.detach().float().requires_grad_(True)
    wr = w.detach().float().requires_grad_(True)
    yr = rms_norm_reference(xr, wr, eps=1e-6, offset=offset, mode=mode)
    yr.backward(dy.float())

    assert y.dtype == (torch.promote_types(dtype, w.dtype) if mode == "llama" else dtype)
    assert_rel_close(y, yr, dtype, name="y")
    assert_rel_close(x.grad, xr.grad, dtype, factor=2, name="dx")
    assert_rel_close(w.grad, wr.grad, dtype, factor=2, name="dw")


def test_rms_norm_llama_rounds_like_hf_in_half_precision():
    if DEVICE.type != "cuda":
        pytest.skip("half precision runs on the GPU only")
    torch.manual_seed(1)
    x = rand(4, 96, dtype=torch.bfloat16)
    w = rand(96, dtype=torch.bfloat16)
    y = rms_norm(x, w)
    ref = rms_norm_reference(x, w)
    assert (y.float() - ref.float()).abs().max() <= 2 * torch.finfo(
        torch.bfloat16
    ).eps * ref.abs().max().float()
