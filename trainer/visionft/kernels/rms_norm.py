"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * (offset + w)``, forward and backward in Triton.

Two casting modes match the Hugging Face modules:

- ``"llama"`` (Llama, Qwen2, Qwen2-VL, Qwen2.5-VL): the normalised row is computed in fp32, cast back
  to the input dtype, then multiplied by the weight; the output dtype is
  ``promote_types(x.dtype, w.dtype)``.
- ``"gemma"`` (Gemma, Gemma 3): everything in fp32, weight used as ``1 + w`` (``offset=1.0``), the
  output cast to the input dtype.

The forward saves the per-row ``rstd`` (fp32, one value per row) and the input; the backward gives
``dx`` row by row and ``dw`` as per-program partial sums reduced once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionft.kernels._utils import MAX_FUSED_SIZE, row_block, sm_count

_MODES = ("llama", "gemma")


@triton.jit
def _rms_norm_forward_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    offset,
    ROUND_TO_INPUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xn = x * rstd
    if ROUND_TO_INPUT:
        xn = xn.to(X.dtype.element_ty).to(tl.float32)
    y = xn * (w + offset)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    offset,
    ROUND_TO_INPUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, n_rows, n_prog):
        row64 = tl.cast(row, tl.int64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xn = x * rstd
        if ROUND_TO_INPUT:
            dw_acc += dy * xn.to(X.dtype.element_ty).to(tl.float32)
        else:
            dw_acc += dy * xn
        dxn = dy * w
        dx = rstd * (dxn - xn * (tl.sum(dxn * xn, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, mode: str):
    """Launches the forward. Returns ``(y, x2d, rstd)``; ``x2d`` is the 2-D contiguous input."""
    shape = x.shape
    n_cols = shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if mode == "llama" else x.dtype
    y = torch.empty((x2.shape[0], n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, warps = row_block(n_cols)
    if x2.shape[0] > 0:
        _rms_norm_forward_kernel[(x2.shape[0],)](
            x2,
            weight,
            y,
            rstd,
            x2.stride(0),
            y.stride(0),
            n_cols,
            eps,
            offset,
            ROUND_TO_INPUT=(mode == "llama"),
            BLOCK=block,
            num_warps=warps,
        )
    return y.view(*shape[:-1], n_cols), x2, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    mode: str,
    need_dw: bool,
):
    """Launches the backward. Returns ``(dx2d, dw or None)``."""
    n_rows, n_cols = x2.shape
    dy2 = dy.reshape(-1, n_cols)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dx = torch.empty_like(x2)
    n_prog = max(1, min(n_rows, sm_count(x2.device) * 2))
    dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device)
    block, warps = row_block(n_cols)
    if n_rows > 0:
        _rms_norm_backward_kernel[(n_prog,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            dw_partial,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            offset,
            ROUND_TO_INPUT=(mode == "llama"),
            BLOCK=block,
            num_warps=warps,
        )
    else:
        dw_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm with Hugging Face numerics.

    ``mode="llama"`` matches ``Qwen2RMSNorm``/``LlamaRMSNorm`` (normalise in fp32, round to the input
    dtype, multiply by ``w``); ``mode="gemma"`` with ``offset=1.0`` matches ``Gemma3RMSNorm``
    (fp32 throughout, ``(1 + w)``). The forward saves the input and the fp32 ``rstd`` per row.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset, mode):
        y, x2, rstd = rms_norm_forward(x, weight, eps, offset, mode)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.mode, ctx.x_shape = offset, mode, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.mode, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, mode: str = "llama"
) -> torch.Tensor:
    """Fused RMSNorm (see ``RMSNormFunction``).

    Args:
        x (torch.Tensor): input, any leading shape; normalised over the last dimension.
        weight (torch.Tensor): 1-D weight of the last dimension's size.
        eps (float): added to the mean square. Default: 1e-6.
        offset (float): added to the weight (1.0 for Gemma). Default: 0.0.
        mode (str): ``"llama"`` or ``"gemma"`` casting (module docstring). Default: "llama".

    Raises:
        ValueError: unknown ``mode``, or a row wider than ``MAX_FUSED_SIZE``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} must be one of {_MODES}")
    if x.shape[-1] > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {x.shape[-1]} elements exceed MAX_FUSED_SIZE={MAX_FUSED_SIZE}")
    return RMSNormFunction.apply(x, weight, eps, offset, mode)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, mode: str = "llama"
) -> torch.Tensor:
    """PyTorch reference, the Hugging Face module forwards written as functions."""
    if mode == "llama":
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (weight + offset) * h.to(x.dtype) if offset else weight * h.to(x.dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (offset + weight.float())).to(x.dtype)
