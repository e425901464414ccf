"""Batches built ahead of the step, in a thread, with the bad-sample counts kept exact.

``Prefetching(loader, collator)`` stands in for the Trainer's data loader: iterating it runs the
loader (sampling, image decoding, the collator) in a background thread that stays ``depth`` batches
ahead of the training loop, so that the GPU never waits for the host to build a batch. Order, content
and errors are the loader's own: an exception in the thread is raised in the loop when it reaches that
batch.

Counts: the collator counts skipped samples when it builds a batch, so batches built ahead but never
trained (the run reached its last step) would count samples the run never took. Each batch carries
the change it made to ``collator.skipped`` and ``collator.substituted``; when iteration stops, the
changes of the batches not handed out are taken back (``collator.uncount``), so the counts are those
of the batches trained, as without prefetching.

``paused()`` holds the thread between batches (it finishes the batch it is building first): a CUDA-graph
capture records every CUDA call of the process in its stream, so the loader's pinned copies must wait.

Everything else (``len``, ``set_epoch``, ``dataset``...) is the loader's.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetching:
    """Iterates ``loader`` in a background thread (module docstring).

    Args:
        loader: the data loader (anything iterable; other attributes are passed through).
        collator: the collator whose ``skipped`` / ``substituted`` counts stay exact (it needs an
            ``uncount(skipped, substituted)`` method); None for none.
        depth (int): batches built ahead. Default: 2.
    """

    def __init__(self, loader: Any, collator: Any = None, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1")
        self.loader = loader
        self.collator = collator
        self.depth = depth
        self._runs: list[_Run] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block no batch is being built (the one under way is finished first)."""
        with self._lock:
            yield

    def __iter__(self) -> Iterator[Any]:
        run = _Run(self.loader, self.collator, self.depth, self._lock)
        self._runs = [r for r in self._runs if not r.done] + [run]
        try:
            yield from run
        finally:
            run.close()

    def close(self) -> None:
        """Stops every iteration still running and takes back the counts of unconsumed batches."""
        for run in self._runs:
            run.close()
        self._runs.clear()


def _counts(collator: Any) -> tuple[int, int]:
    if collator is None:
        return 0, 0
    return int(getattr(collator, "skipped", 0)), int(getattr(collator, "substituted", 0))


class _Run:
    def __init__(self, loader: Any, collator: Any, depth: int, busy: threading.Lock) -> None:
        self.collator = collator
        self.busy = busy
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.done = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._fill, args=(loader,), name="visionft-prefetch", daemon=True
        )
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, loader: Any) -> None:
        try:
            iterator = iter(loader)
            while not self.stop.is_set():
                with self.busy:
                    before = _counts(self.collator)
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    after = _counts(self.collator)
                delta = (after[0] - before[0], after[1] - before[1])
                if not self._put((batch, delta)):
                    self._uncount(delta)
                    return
        except BaseException as err:  # handed to the training loop, which raises it
            self._put(_Failure(err))
            return
        self._put(_END)

    def _uncount(self, delta: tuple[int, int]) -> None:
        if self.collator is not None and any(delta):
            self.collator.uncount(*delta)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is _END:
                self.done = True
                return
            if isinstance(item, _Failure):
                self.done = True
                raise item.error
            batch, _ = item
            yield batch

    def close(self) -> None:
        with self._lock:
            if self.stop.is_set():
                return
            self.stop.set()
        self.thread.join()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                self._uncount(item[1])
        self.done = True


__all__ = ["Prefetching"]
