"""Devices, dtypes and tolerances shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

#: fp32 everywhere; bf16/fp16 only on the GPU (the interpreter is for correctness of the code paths).
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if CUDA else [])
DTYPE_PARAMS = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPES]

#: ||out - ref|| / ||ref|| bound, per dtype, against a reference computed on fp32-upcast inputs.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rand(*shape, dtype=torch.float32, scale=1.0, requires_grad=False, gen=None) -> torch.Tensor:
    t = (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def assert_rel_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0, name: str = ""
) -> None:
    """Relative L2 error under ``REL_TOL[dtype] * factor``; NaN or Inf never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    err = (out64 - ref64).norm() / ref64.norm().clamp(min=1e-30)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"
