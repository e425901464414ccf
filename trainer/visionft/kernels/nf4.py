"""NF4 dequantization of the bitsandbytes 4-bit storage format, in one Triton launch.

The format (bitsandbytes ``Params4bit`` + ``QuantState``, ``quant_type="nf4"``):

- ``packed``: uint8, ``numel / 2`` bytes; the weight (``QuantState.shape``, row-major) flattened, two
  4-bit codes per byte, the **high nibble first** (element ``2i`` is ``byte[i] >> 4``, element
  ``2i+1`` is ``byte[i] & 0xF``).
- ``code``: the 16 NF4 values (fp32), indexed by the 4-bit code.
- ``blocksize`` (64 for weights): elements sharing one absmax.
- ``absmax``: one scale per block. Without double quantization it is fp32. With it
  (``compress_statistics=True``, ``QuantState.nested``) it is uint8, itself blockwise-quantized by
  ``state2``: ``absmax[j] = state2.code[absmax_u8[j]] * state2.absmax[j // state2.blocksize] + offset``
  where ``state2.code`` is a 256-entry fp32 map (bitsandbytes' signed dynamic map), ``state2.blocksize``
  is 256 and ``offset`` is the mean that was subtracted before quantizing the absmax.
- The weight: ``W.flat[e] = code[nibble(e)] * absmax[e // blocksize]``, in fp32, then cast.

The kernel decodes both levels in one pass, reading ``offset`` from device memory (no host sync).
``quantize_nf4_reference`` builds the same format in plain PyTorch, so CPU tests need no
bitsandbytes; it follows the layout exactly, but uses a uniform 256-value map for ``state2.code``
instead of bitsandbytes' dynamic map (the dequantizer reads whatever map the state carries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: The 16 NF4 levels (quantiles of N(0, 1), normalised to [-1, 1]) as bitsandbytes stores them.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_BLOCK = 1024  # bytes per program (2048 weights)


@triton.jit
def _nf4_dequant_kernel(
    QW,
    ABSMAX,
    CODE,
    ABSMAX2,
    CODE2,
    OFFSET,
    OUT,
    n_bytes,
    bytes_per_block,
    blocksize2,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(QW + offs, mask=mask, other=0).to(tl.int32)
    blk = offs // bytes_per_block
    if NESTED:
        aq = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(ABSMAX2 + blk // blocksize2, mask=mask, other=0.0)
        absmax = tl.load(CODE2 + aq, mask=mask, other=0.0) * a2 + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    hi = tl.load(CODE + (byte >> 4), mask=mask, other=0.0) * absmax
    lo = tl.load(CODE + (byte & 15), mask=mask, other=0.0) * absmax
    tl.store(OUT + 2 * offs, hi.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + 2 * offs + 1, lo.to(OUT.dtype.element_ty), mask=mask)


@dataclass
class NestedState:
    """``QuantState.state2``: how the uint8 absmax is itself quantized."""

    absmax: torch.Tensor  # fp32, one per ``blocksize`` absmax values
    code: torch.Tensor  # fp32, 256 entries
    blocksize: int = 256


@dataclass
class NF4State:
    """The fields of bitsandbytes' ``QuantState`` this module reads (same names, so either works)."""

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int = 64
    dtype: torch.dtype = torch.bfloat16
    offset: torch.Tensor | None = None
    state2: NestedState | None = None
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantizes a bitsandbytes NF4 weight to ``state.shape`` in ``dtype`` (default ``state.dtype``).

    Args:
        packed (torch.Tensor): the uint8 storage (``Params4bit`` data, any shape, ``numel/2`` bytes).
        state: a bitsandbytes ``QuantState`` or an ``NF4State``.
        dtype (torch.dtype | None): output dtype. Default: ``state.dtype``.

    Raises:
        ValueError: not NF4/FP4 4-bit storage of the stated shape, or an odd blocksize.
    """
    shape = torch.Size(state.shape)
    numel = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() * 2 != numel:
        raise ValueError(
            f"packed {packed.dtype} of {packed.numel()} bytes does not hold {tuple(shape)} in 4 bits"
        )
    if state.blocksize % 2:
        raise ValueError(f"blocksize={state.blocksize} must be even")
    out = torch.empty(shape, dtype=dtype or state.dtype, device=packed.device)
    nested = getattr(state, "state2", None) is not None and getattr(state, "nested", True)
    if nested:
        s2 = state.state2
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1)
        args = (state.absmax, state.code, s2.absmax, s2.code, offset)
        blocksize2 = s2.blocksize
    else:
        args = (state.absmax, state.code, state.absmax, state.code, state.code)
        blocksize2 = 1
    n_bytes = packed.numel()
    if n_bytes:
        _nf4_dequant_kernel[(triton.cdiv(n_bytes, _BLOCK),)](
            packed.reshape(-1),
            *args,
            out,
            n_bytes,
            state.blocksize // 2,
            blocksize2,
            NESTED=nested,
            BLOCK=_BLOCK,
        )
    return out


# --------------------------------------------------------------------------------------------------
# PyTorch references: quantizer (builds the format) and dequantizer (reads it)
# --------------------------------------------------------------------------------------------------


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (values.unsqueeze(-1) - code).abs().argmin(-1).to(torch.uint8)


def quantize_nf4_reference(
    weight: torch.Tensor, blocksize: int = 64, nested: bool = True, blocksize2: int = 256
) -> tuple[torch.Tensor, NF4State]:
    """Quantizes ``weight`` to the bitsandbytes NF4 layout (module docstring) in plain PyTorch.

    Returns:
        tuple[torch.Tensor, NF4State]: the packed uint8 storage ``(numel/2, 1)`` and its state.
    """
    flat = weight.detach().float().reshape(-1)
    numel = flat.numel()
    if numel % 2:
        raise ValueError("the weight must have an even number of elements")
    n_blocks = -(-numel // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - numel))
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(1).clamp(min=1e-12)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    idx = _nearest((blocks / absmax[:, None]).reshape(-1)[:numel], code)
    packed = ((idx[0::2] << 4) | idx[1::2]).view(-1, 1)
    state = NF4State(absmax=absmax, shape=weight.shape, code=code, blocksize=blocksize, dtype=weight.dtype)
    if nested:
        offset = absmax.mean()
        centered = absmax - offset
        n2 = -(-n_blocks // blocksize2)
        c_pad = torch.nn.functional.pad(centered, (0, n2 * blocksize2 - n_blocks)).view(n2, blocksize2)
        absmax2 = c_pad.abs().amax(1).clamp(min=1e-12)
        code2 = torch.linspace(-1.0, 1.0, 256, dtype=torch.float32, device=weight.device)
        aq = _nearest((c_pad / absmax2[:, None]).reshape(-1)[:n_blocks], code2)
        state.absmax = aq
        state.offset = offset.reshape(())
        state.state2 = NestedState(absmax=absmax2, code=code2, blocksize=blocksize2)
    return packed, state


def dequantize_nf4_reference(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantization of the same format (the specification the kernel is tested on)."""
    b = packed.reshape(-1).to(torch.int64)
    idx = torch.stack((b >> 4, b & 15), dim=1).reshape(-1)
    nested = getattr(state, "state2", None) is not None and getattr(state, "nested", True)
    if nested:
        s2 = state.state2
        aq = state.absmax.reshape(-1).to(torch.int64)
        rep = torch.arange(aq.numel(), device=aq.device) // s2.blocksize
        absmax = s2.code[aq] * s2.absmax[rep] + torch.as_tensor(state.offset, device=aq.device).float()
    else:
        absmax = state.absmax.float().reshape(-1)
    per_elem = absmax.repeat_interleave(state.blocksize)[: idx.numel()]
    w = state.code.float()[idx] * per_elem
    return w.to(dtype or state.dtype).view(torch.Size(state.shape))
