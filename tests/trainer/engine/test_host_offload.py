"""``visionft.engine.host_offload``: checkpointed block inputs held on the host give the same loss and
gradients as checkpointing alone, each block input is copied once into a buffer its signature keeps, and
a capture without buffers keeps the tensors on the device. On CPU (the stream and capture paths run in
``tests/patching/test_rows_gpu.py``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from visionft.engine.host_offload import HostOffload


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden, scale):
        return hidden + self.down(torch.nn.functional.gelu(self.up(hidden))) * scale


class Stack(nn.Module):
    """Blocks called through a checkpoint function, as transformers' checkpointed layers are."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x, checkpoint_fn):
        scale = torch.full((x.shape[0], 1), 0.5)  # one tensor passed to every block
        for block in self.blocks:
            x = checkpoint_fn(block, x, scale)
        return x.square().mean()


def _grads(model, x, checkpoint_fn, context):
    model.zero_grad(set_to_none=True)
    with context:
        loss = model(x, checkpoint_fn)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _plain(function, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


def test_offloaded_inputs_give_the_checkpointed_loss_and_gradients():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(32, 16, requires_grad=True)
    offload = HostOffload(min_bytes=0)
    loss_ref, grads_ref = _grads(model, x, _plain, contextlib.nullcontext())
    loss, grads = _grads(model, x, offload.checkpoint, offload.step("sig"))
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    # Each block's hidden input went to the host once; the shared scale only the first time.
    per_input = 32 * 16 * 4
    assert offload.last == {"offloaded_bytes": 4 * per_input + 32 * 4, "kept_on_device": 0}


def test_a_signature_keeps_its_buffers_and_a_capture_reuses_them():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(32, 16, requires_grad=True)
    offload = HostOffload(min_bytes=1024)  # the shared 128-byte scale stays on the device
    _grads(model, x, offload.checkpoint, offload.step("sig"))
    buffers = list(offload._slots["sig"])
    held = offload.host_bytes()
    assert len(buffers) == 4 and held == 4 * 32 * 16 * 4
    # A later step of the same signature (and a capture of it) writes into the same buffers.
    _grads(model, x, offload.checkpoint, offload.step("sig", capturing=True))
    assert offload.host_bytes() == held and offload.last["kept_on_device"] == 0
    assert all(a is b for a, b in zip(offload._slots["sig"], buffers, strict=True))
    # A capture of a signature no eager step prepared allocates nothing and keeps its inputs.
    loss, grads = _grads(model, x, offload.checkpoint, offload.step("other", capturing=True))
    assert offload.last == {"offloaded_bytes": 0, "kept_on_device": 4}
    assert offload.host_bytes() == held
    loss_ref, grads_ref = _grads(model, x, _plain, contextlib.nullcontext())
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))


def test_a_step_of_other_shapes_replaces_a_buffer_that_no_longer_fits():
    model = Stack()
    offload = HostOffload(min_bytes=0)
    _grads(model, torch.randn(8, 16, requires_grad=True), offload.checkpoint, offload.step("sig"))
    _grads(model, torch.randn(12, 16, requires_grad=True), offload.checkpoint, offload.step("sig"))
    assert {tuple(b.shape) for b in offload._slots["sig"][:1]} == {(12, 16)}


def test_outside_a_step_it_is_plain_checkpointing_and_a_capture_needs_a_key():
    model = Stack()
    x = torch.randn(8, 16, requires_grad=True)
    offload = HostOffload(min_bytes=0)
    loss, grads = _grads(model, x, offload.checkpoint, contextlib.nullcontext())
    loss_ref, grads_ref = _grads(model, x, _plain, contextlib.nullcontext())
    assert torch.equal(loss, loss_ref) and offload.host_bytes() == 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    with pytest.raises(ValueError, match="needs a key"), offload.step(None, capturing=True):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copy needs CUDA")
def test_an_input_changed_in_place_during_its_copy_stops_the_step():
    offload = HostOffload(min_bytes=1024)  # the hidden input goes to the host, the small scale stays
    block = Block(16).cuda()
    x = torch.randn(32, 16, device="cuda", requires_grad=True)
    scale = torch.full((32, 1), 0.5, device="cuda")

    with pytest.raises(RuntimeError, match="modified in place"), offload.step("sig"):
        hidden = x * 1.0
        out = offload.checkpoint(block, hidden, scale)
        with torch.no_grad():
            hidden.mul_(2.0)  # while its copy to the host may still run
        offload.checkpoint(block, out, scale)
