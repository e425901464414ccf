"""Fused ``lm_head`` + cross-entropy that never holds the full tokens x vocab logits.

The forward walks the tokens in chunks. For each chunk it computes the chunk's logits with one
matmul, runs one Triton program per row that computes ``logsumexp`` and the row's loss and
overwrites the logits in place with ``softmax - onehot(label)`` (zeros for ignored rows), then
turns that into the chunk's ``d hidden`` (and accumulates ``d weight`` when the weight needs a
gradient). Only one chunk of logits is alive at a time; the gradients are ready when the forward
returns and the backward only scales them by the incoming gradient.

Reduction: ``"mean"`` over the non-ignored tokens (the count stays on the device: no host sync),
or ``sum / num_items_in_batch`` when that is given (Hugging Face's gradient-accumulation path), or
``"sum"``. Labels equal to ``ignore_index`` (default -100) contribute nothing. A batch with no
valid label gives loss 0 (Hugging Face gives NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionft.kernels.amp import autocast_dtype

#: Bytes of logits one chunk may hold.
CHUNK_BYTES = 64 * 1024 * 1024


@triton.jit
def _ce_rows_kernel(
    LOGITS,
    stride_l,
    LABELS,
    LOSS,
    n_vocab,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    n_live = tl.where(valid, n_vocab, 0)
    cols = tl.arange(0, BLOCK)
    # Pass 1: running max and sum of exponentials (online softmax), only for valid rows.
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_live, BLOCK):
        mask = start + cols < n_vocab
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        acc = acc * scale + tl.where(mask, tl.exp(x - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    acc_row = tl.sum(acc * tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row)), axis=0)
    lse = m_row + tl.log(acc_row)
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(base + safe_label).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_label, 0.0))
    # Pass 2: overwrite the logits with d loss / d logits = softmax - onehot (unscaled).
    for start in range(0, n_live, BLOCK):
        idx = start + cols
        mask = idx < n_vocab
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)
        tl.store(base + idx, grad.to(LOGITS.dtype.element_ty), mask=mask)
    # Ignored rows: zero gradient.
    for start in range(0, n_vocab - n_live, BLOCK):
        idx = start + cols
        tl.store(base + idx, tl.zeros((BLOCK,), tl.float32).to(LOGITS.dtype.element_ty), mask=idx < n_vocab)


def _chunk_rows(n_rows: int, n_vocab: int, elem: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    rows = max(16, CHUNK_BYTES // max(1, n_vocab * elem))
    return min(n_rows, triton.next_power_of_2(rows) if rows < 16384 else rows) or 1


def fused_linear_ce_forward(hidden, weight, labels, bias, ignore_index, chunk_size, need_dh, need_dw):
    """Runs the chunked loop. Returns ``(loss_sum, n_valid, dh, dw, db)``, gradients unscaled."""
    n_rows, _ = hidden.shape
    n_vocab = weight.shape[0]
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db = (
        torch.zeros(n_vocab, dtype=torch.float32, device=hidden.device)
        if (need_dw and bias is not None)
        else None
    )
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    rows = _chunk_rows(n_rows, n_vocab, hidden.element_size(), chunk_size)
    block = min(triton.next_power_of_2(n_vocab), 4096 if hidden.is_cuda else 1024)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h = hidden[start:end]
        logits = h @ weight.t()
        if bias is not None:
            logits += bias
        _ce_rows_kernel[(end - start,)](
            logits,
            logits.stride(0),
            labels[start:end],
            losses[start:end],
            n_vocab,
            ignore_index,
            BLOCK=block,
            num_warps=16 if block >= 4096 else 4,
        )
        if dh is not None:
            torch.mm(logits, weight, out=dh[start:end])
        if dw is not None:
            dw.addmm_(logits.t(), h)
        if db is not None:
            db += logits.sum(0, dtype=torch.float32)
    n_valid = (labels != ignore_index).sum()
    return losses.sum(), n_valid, dh, dw, db


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T + bias, labels, ignore_index)`` without full logits.

    Gradients are computed in the forward (the backward only scales them), as in Liger-Kernel's
    fused linear cross-entropy. The logits of a chunk are in the hidden states' dtype (as
    ``lm_head`` gives them in Hugging Face models); the softmax is computed in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, num_items, chunk_size):
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[3])
        loss_sum, n_valid, dh, dw, db = fused_linear_ce_forward(
            hidden, weight, labels, bias, ignore_index, chunk_size, need_dh, need_dw
        )
        if reduction == "sum":
            denom = None
        elif num_items is not None:
            denom = torch.as_tensor(num_items, device=hidden.device).to(torch.float32)
        else:
            denom = n_valid.clamp(min=1).to(torch.float32)
        loss = loss_sum if denom is None else loss_sum / denom
        ctx.denom = denom
        ctx.save_for_backward(*(t if t is not None else hidden.new_empty(0) for t in (dh, dw, db)))
        ctx.have = (dh is not None, dw is not None and ctx.needs_input_grad[1], db is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, db = ctx.saved_tensors
        scale = grad_loss if ctx.denom is None else grad_loss / ctx.denom
        out_dh = (dh * scale.to(dh.dtype)) if ctx.have[0] else None
        out_dw = (dw * scale.to(dw.dtype)) if ctx.have[1] else None
        out_db = (db * scale).to(dh.dtype if ctx.have[0] else db.dtype) if ctx.have[2] else None
        return out_dh, out_dw, None, out_db, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, chunked over tokens.

    Args:
        hidden (torch.Tensor): ``(N, H)`` (leading dims are flattened).
        weight (torch.Tensor): ``(V, H)``, the ``lm_head`` weight.
        labels (torch.Tensor): ``(N,)`` integer targets, already shifted.
        bias (torch.Tensor | None): ``(V,)`` or None. Default: None.
        ignore_index (int): label value that contributes nothing. Default: -100.
        reduction (str): ``"mean"`` (over valid labels, or ``/ num_items_in_batch``) or ``"sum"``.
        num_items_in_batch (int | torch.Tensor | None): divisor replacing the valid count. Default: None.
        chunk_size (int | None): tokens per chunk; None sizes chunks to ``CHUNK_BYTES``. Default: None.

    Raises:
        ValueError: unknown ``reduction`` or mismatched shapes.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)} do not match"
        )
    amp = autocast_dtype(hidden.device.type)
    if amp is not None:  # logits in the autocast dtype, as lm_head under autocast (kernels.amp says why)
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(amp),
                weight.to(amp),
                labels,
                None if bias is None else bias.to(amp),
                ignore_index,
                reduction,
                num_items_in_batch,
                chunk_size,
            )
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels.contiguous(), bias, ignore_index, reduction, num_items_in_batch, chunk_size
    )


def fused_linear_cross_entropy_reference(
    hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", num_items_in_batch=None
):
    """PyTorch reference: full logits in the hidden dtype, loss in fp32 (as ``ForCausalLMLoss``)."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    red = "sum" if (reduction == "sum" or num_items_in_batch is not None) else "mean"
    loss = torch.nn.functional.cross_entropy(
        logits, labels.reshape(-1), ignore_index=ignore_index, reduction=red
    )
    if num_items_in_batch is not None and reduction == "mean":
        loss = loss / num_items_in_batch
    return loss
