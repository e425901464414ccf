"""Checkpointed block inputs kept in pinned host memory, in a form a CUDA graph can capture.

With activation checkpointing the memory that grows with depth is each block's input, saved until that
block is recomputed in backward (a 27-layer SigLIP tower on four 896 px images holds about 1 GiB of
them). ``torch.autograd.graph.save_on_cpu`` moves them to the host, but it allocates a pinned tensor for
every saved tensor on every step, which a capture refuses, and it copies on the compute stream, which
stalls every block.

``HostOffload`` does the same move in a graph-friendly way:

- the pinned buffers belong to a step signature: the eager warm-up steps of a signature allocate them,
  in the order the blocks save their inputs, and the capture of that signature reuses them, so the
  captured copies read and write the same host memory on every replay;
- the copy to the host runs on a side stream; the compute stream waits for it only when the next block
  saves its input, so the copy overlaps a block's compute, and the device tensor is dropped then;
- in backward, restoring a block's input also starts the copy back of the block before it (the next one
  backward reaches) on the side stream.

Only the tensors passed to a checkpointed block go through here (the block's own saved tensors are
checkpointing's), and of those only tensors of at least ``min_bytes`` that no earlier block of the same
step passed (position embeddings shared by every layer stay on the device). A capture that finds no
buffer for a tensor (a signature captured without a warm-up) keeps that tensor on the device.

Copies overlap compute only if nothing modifies a block's input in place while it is being copied, which
holds for the transformers blocks this engine trains; a change seen when the copy is waited for stops the
step with an error rather than train on a torn copy.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

#: Inputs smaller than this stay on the device (copies of small tensors cost more than they save).
MIN_BYTES = 1 << 20


@dataclass
class _Packed:
    """A saved tensor that lives in ``host`` until backward needs it."""

    index: int
    host: torch.Tensor
    device: torch.device


@dataclass
class _Step:
    """One forward + backward: the signature's buffers and the copies in flight."""

    slots: list[torch.Tensor] | None  # None: buffers for this step only
    capturing: bool
    count: int = 0
    seen: dict[int, weakref.ref] = field(default_factory=dict)
    packed: dict[int, _Packed] = field(default_factory=dict)
    to_host: tuple[torch.Tensor, torch.cuda.Event, int] | None = None
    to_device: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = field(default_factory=dict)
    offloaded_bytes: int = 0
    kept: int = 0
    side_used: bool = False


class HostOffload:
    """The checkpoint function of every checkpointed block, holding the blocks' inputs on the host
    during a step (module docstring).

    Args:
        min_bytes (int): inputs smaller than this stay on the device. Default: ``MIN_BYTES``.
    """

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self._slots: dict[Hashable, list[torch.Tensor]] = {}
        self._side: torch.cuda.Stream | None = None
        self._step: _Step | None = None
        #: Bytes moved to the host by the last step, and inputs that a capture had to keep on the device.
        self.last = {"offloaded_bytes": 0, "kept_on_device": 0}

    # -- public --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, key: Hashable | None, capturing: bool = False) -> Iterator[None]:
        """Around one forward + backward whose blocks' inputs go to the host.

        Args:
            key (Hashable | None): the step's signature; steps of one key save the same tensors and share
                buffers. None: buffers for this step only (not allowed while capturing).
            capturing (bool): a CUDA graph records this step: buffers are reused, never allocated.
                Default: False.
        """
        if capturing and key is None:
            raise ValueError("a captured step needs a key: its buffers must outlive the capture")
        if self._step is not None:
            raise RuntimeError("HostOffload.step is not reentrant")
        slots = None if key is None else self._slots.setdefault(key, [])
        self._step = _Step(slots=slots, capturing=capturing)
        try:
            yield
        finally:
            state, self._step = self._step, None
            self._join(state)
            self.last = {"offloaded_bytes": state.offloaded_bytes, "kept_on_device": state.kept}

    def checkpoint(self, function, *args, **kwargs):
        """Non-reentrant checkpointing of ``function`` whose inputs go to the host inside ``step``.

        No RNG state is kept: a graph-captured step has no dropout to replay, and the state copy is a
        host read that a capture refuses.
        """
        kwargs.setdefault("use_reentrant", False)
        kwargs.setdefault("preserve_rng_state", False)
        if self._step is None:
            return checkpoint(function, *args, **kwargs)
        # Non-reentrant checkpointing saves its inputs under the hooks active when it is called (these);
        # what the block saves inside goes through checkpointing's own hooks.
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def host_bytes(self) -> int:
        """Pinned host bytes held for all signatures."""
        return sum(t.numel() * t.element_size() for slots in self._slots.values() for t in slots)

    # -- hooks ---------------------------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor) -> Any:
        state = self._step
        if state is None or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        ref = state.seen.get(tensor.data_ptr())
        if ref is not None and ref() is tensor:
            return tensor  # passed to an earlier block too: alive anyway
        state.seen[tensor.data_ptr()] = weakref.ref(tensor)
        index = state.count
        state.count += 1
        host = self._buffer(state, index, tensor)
        if host is None:
            state.kept += 1
            return tensor
        packed = _Packed(index=index, host=host, device=tensor.device)
        state.packed[index] = packed
        state.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            host.copy_(tensor)
            return packed
        self._wait_to_host(state)
        side = self._side_stream()
        state.side_used = True
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        state.to_host = (tensor, done, tensor._version)  # alive until the copy is waited for
        return packed

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        state = self._step
        if packed.device.type != "cuda":
            return packed.host.to(packed.device, copy=True)
        if state is not None:
            self._wait_to_host(state)
        current = torch.cuda.current_stream()
        ahead = state.to_device.pop(packed.index, None) if state is not None else None
        if ahead is not None:
            tensor, done = ahead
            current.wait_event(done)
        else:
            tensor = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=packed.device)
            tensor.copy_(packed.host, non_blocking=True)
        if state is not None:
            self._prefetch(state, packed.index - 1)
        return tensor

    # -- internals -----------------------------------------------------------------------------------

    def _buffer(self, state: _Step, index: int, tensor: torch.Tensor) -> torch.Tensor | None:
        slots = state.slots
        held = slots[index] if slots is not None and index < len(slots) else None
        if held is not None and held.shape == tensor.shape and held.dtype == tensor.dtype:
            return held
        if state.capturing:  # a capture records copies into existing buffers only
            return None
        host = torch.empty(
            tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.device.type == "cuda"
        )
        if slots is not None:
            if index < len(slots):
                slots[index] = host
            else:
                slots.append(host)
        return host

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream()
        return self._side

    def _wait_to_host(self, state: _Step) -> None:
        if state.to_host is not None:
            tensor, done, version = state.to_host
            torch.cuda.current_stream().wait_event(done)
            state.to_host = None
            if tensor._version != version:
                # The copy may have read the tensor before or after the change: refuse, do not guess.
                raise RuntimeError(
                    "a checkpointed block input was modified in place while it was being copied to the "
                    "host; set training.gradientCheckpointing to 'on' for this model"
                )

    def _prefetch(self, state: _Step, index: int) -> None:
        packed = state.packed.get(index)
        if packed is None or index in state.to_device:
            return
        current = torch.cuda.current_stream()
        tensor = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=packed.device)
        side = self._side_stream()
        state.side_used = True
        side.wait_stream(current)
        with torch.cuda.stream(side):
            tensor.copy_(packed.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        state.to_device[index] = (tensor, done)

    def _join(self, state: _Step) -> None:
        if state.side_used and self._side is not None:
            # Joins every copy of the step back into the compute stream (a capture must end joined).
            torch.cuda.current_stream().wait_stream(self._side)
        state.to_host = None
        state.to_device.clear()
        state.packed.clear()


__all__ = ["MIN_BYTES", "HostOffload"]
