"""Gated MLP activations: SwiGLU ``silu(g) * u`` and GeGLU ``gelu_tanh(g) * u``, one launch each way.

The forward reads ``g`` and ``u`` once and writes ``h``; the backward reads ``dh``, ``g`` and ``u``
once and writes ``dg`` and ``du``, recomputing the activation instead of saving it. GeGLU uses the
tanh approximation (``gelu_pytorch_tanh``, Gemma's ``hidden_activation``)::

    gelu_tanh(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),   k = sqrt(2 / pi)

Computed in fp32, stored in the input dtype. Hugging Face computes ``act(g)`` in the input dtype and
rounds it before the product, so bf16 results differ by about an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACTS = ("silu", "gelu_tanh")
_BLOCK = 1024


@triton.jit
def _tanh(x):
    # tanh through exp: works on the GPU and in the interpreter alike.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr):
    if GELU:
        k0 = 0.7978845608028654
        inner = k0 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        sig = 1.0 / (1.0 + tl.exp(-g))
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    return act, dact


@triton.jit
def _glu_forward_kernel(G, U, H, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, GELU)
    tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(DH, G, U, DG, DU, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, GELU)
    tl.store(DG + offs, (dh * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=mask)


def glu_forward(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """Launches the forward on contiguous ``g``, ``u`` of one shape."""
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _glu_forward_kernel[(triton.cdiv(n, _BLOCK),)](g, u, h, n, GELU=(act == "gelu_tanh"), BLOCK=_BLOCK)
    return h


def glu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str):
    """Launches the backward. Returns ``(dg, du)``."""
    dh = dh.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _glu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
            dh, g, u, dg, du, n, GELU=(act == "gelu_tanh"), BLOCK=_BLOCK
        )
    return dg, du


class GLUFunction(torch.autograd.Function):
    """``act(g) * u`` with ``act`` in ``("silu", "gelu_tanh")``; saves ``g`` and ``u`` only."""

    @staticmethod
    def forward(ctx, g, u, act):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        ctx.act = act
        return glu_forward(g, u, act)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = glu_backward(dh, g, u, ctx.act)
        return dg, du, None


def _check(g, u, act):
    if act not in _ACTS:
        raise ValueError(f"act={act!r} must be one of {_ACTS}")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"gate {tuple(g.shape)}/{g.dtype} and up {tuple(u.shape)}/{u.dtype} must match")


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(g) * u``."""
    _check(g, u, "silu")
    return GLUFunction.apply(g, u, "silu")


def geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Fused ``gelu(g, approximate="tanh") * u``."""
    _check(g, u, "gelu_tanh")
    return GLUFunction.apply(g, u, "gelu_tanh")


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP``: ``ACT2FN["silu"](g) * u``."""
    return torch.nn.functional.silu(g) * u


def geglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gemma MLP: ``ACT2FN["gelu_pytorch_tanh"](g) * u``."""
    return torch.nn.functional.gelu(g, approximate="tanh") * u
