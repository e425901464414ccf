"""NF4 dequantization vs the plain-PyTorch specification of the bitsandbytes format, and (on the
GPU, when bitsandbytes is installed) vs bitsandbytes itself."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference, quantize_nf4_reference

from tests.kernels.helpers import CUDA, DEVICE, rand

SHAPES = [(64, 64), (37, 128), (96, 2 * 123), (3, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_matches_reference(shape, nested, blocksize):
    torch.manual_seed(0)
    w = rand(*shape)
    packed, state = quantize_nf4_reference(w, blocksize=blocksize, nested=nested)
    assert packed.dtype == torch.uint8 and packed.shape == (w.numel() // 2, 1)
    out = dequantize_nf4(packed, state, torch.float32)
    ref = dequantize_nf4_reference(packed, state, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # and the quantization is an NF4 one: error bounded by half the widest code gap x absmax
    err = (out - w).abs().max().item()
    assert err <= 0.2 * w.abs().max().item()


def test_reference_format_high_nibble_first():
    w = torch.zeros(1, 64, device=DEVICE)
    w[0, 0], w[0, 1] = 1.0, -1.0  # codes 15 and 0
    packed, state = quantize_nf4_reference(w, nested=False)
    assert packed[0, 0].item() == (15 << 4) | 0
    assert state.code.tolist() == pytest.approx(list(NF4_CODE))


@pytest.mark.skipif(not CUDA, reason="bitsandbytes 4-bit kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_dequantize_matches_bitsandbytes(dtype, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = rand(384, 1000, dtype=dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
    out = dequantize_nf4(packed, qs)
    assert out.dtype == ref.dtype == dtype
    # Same codes and scales; the kernel fuses ``code2 * absmax2 + offset`` (an FMA) where bitsandbytes
    # rounds the product first, so a few values differ in the last bit.
    torch.testing.assert_close(out, ref)
