"""LoRA linear over a frozen NF4 base, as one autograd Function that keeps no dequantized weight.

Forward::

    W   = dequantize_nf4(packed, state)              # transient, freed before returning
    xa  = x @ A^T                                     # (T, r), saved
    out = x @ W^T (+ bias) + s * xa @ B^T

Backward (``dy`` of shape (T, out))::

    dyb = dy @ B                                      # (T, r)
    dA  = s * dyb^T @ x          dB = s * dy^T @ xa
    dx  = dy @ W + s * dyb @ A                        # W dequantized again here

Saved between forward and backward: ``x``, ``xa`` (T x r) and references to A and B. The LoRA
matmuls run in the input dtype (bf16 in training); ``dA``/``dB`` are returned in the adapters'
dtype (PEFT keeps adapters in fp32 and runs them in fp32: results differ at bf16 rounding).
Lora dropout is not supported here (the patch layer falls back to PEFT when dropout > 0).
The dequantization is one Triton launch (``nf4.dequantize_nf4``); the matmuls are cuBLAS.

With ``state=None`` the base weight is a plain (frozen) tensor and is used as is: the same
Function then serves the unquantized LoRA layers (e.g. a vision tower kept in 16 bit), replacing
PEFT's dropout/cast/matmul/scale/add sequence with two matmuls and one ``addmm``.
"""

from __future__ import annotations

import torch

from visionft.kernels.amp import autocast_dtype
from visionft.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference


def _base_weight(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    if state is None:
        return packed.to(dtype)
    return dequantize_nf4(packed, state, dtype)


def _base_out(x2: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` in ``x2``'s dtype, the weight dequantized for this call only."""
    w = _base_weight(packed, state, x2.dtype)
    # The bias rides in the GEMM's epilogue: a separate add would read and write the whole output again
    # (a SigLIP tower at 16k patches spends more time in those adds than in its norms).
    out = x2 @ w.t() if bias is None else torch.addmm(bias.to(x2.dtype), x2, w.t())
    del w
    return out


class LoRANF4Function(torch.autograd.Function):
    """``x @ W^T + bias + scale * (x @ A^T) @ B^T`` with ``W`` stored in NF4 (see module docstring)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, lora_a, lora_b, scale):
        in_features = lora_a.shape[1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        dtype = x.dtype
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        out = _base_out(x2, packed, state, bias)
        xa = x2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        ctx.packed, ctx.state, ctx.scale, ctx.lead = packed, state, scale, lead
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        # Explicit dtypes throughout: an autocast around backward would recast the in-place addmm's inputs.
        with torch.autocast(dy.device.type, enabled=False):
            return LoRANF4Function._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dtype = dy2.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        scale = ctx.scale
        dyb = dy2 @ b
        d_a = d_b = dx = None
        if ctx.needs_input_grad[4]:
            d_a = (dyb.t() @ x2.to(dtype)).mul_(scale).to(lora_a.dtype)
        if ctx.needs_input_grad[5]:
            d_b = (dy2.t() @ xa.to(dtype)).mul_(scale).to(lora_b.dtype)
        if ctx.needs_input_grad[0]:
            w = _base_weight(ctx.packed, ctx.state, dtype)
            dx = dy2 @ w
            del w
            dx.addmm_(dyb, a, alpha=scale)
            dx = dx.view(*ctx.lead, dx.shape[-1])
        return dx, None, None, None, d_a, d_b, None


def lora_nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Applies ``LoRANF4Function``.

    Args:
        x (torch.Tensor): ``(..., in)``.
        packed (torch.Tensor): the NF4 storage (``Params4bit`` data), or a plain weight ``(out, in)``.
        state: its bitsandbytes ``QuantState`` or an ``NF4State``; None for a plain weight.
        bias (torch.Tensor | None): the frozen base bias ``(out,)``.
        lora_a (torch.Tensor): ``(r, in)``.
        lora_b (torch.Tensor): ``(out, r)``.
        scale (float): ``lora_alpha / r`` (or PEFT's ``scaling[adapter]``).
    """
    amp = autocast_dtype(x.device.type)
    if amp is not None:  # the Function computes in its input's dtype (kernels.amp says why)
        with torch.autocast(x.device.type, enabled=False):
            return LoRANF4Function.apply(x.to(amp), packed, state, bias, lora_a, lora_b, scale)
    return LoRANF4Function.apply(x, packed, state, bias, lora_a, lora_b, scale)


def base_linear(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None) -> torch.Tensor:
    """The base layer alone, through the same dequantization and matmul as ``LoRANF4Function``'s forward.

    A layer with its adapters disabled then gives bit for bit what it gives with a zero LoRA ``B``: a DPO
    reference pass (adapters off) matches the policy before its first update, as it does in plain PEFT.
    No gradient: it serves passes under ``torch.no_grad``.
    """
    amp = autocast_dtype(x.device.type)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.to(amp) if amp is not None else x
        out = _base_out(x.reshape(-1, x.shape[-1]), packed, state, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def lora_nf4_linear_reference(x, packed, state, bias, lora_a, lora_b, scale):
    """PyTorch reference: dequantize with ``dequantize_nf4_reference`` and let autograd do the rest."""
    w = packed.to(x.dtype) if state is None else dequantize_nf4_reference(packed, state, x.dtype)
    out = torch.nn.functional.linear(x, w, bias)
    return (
        out
        + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
        * scale
    )
