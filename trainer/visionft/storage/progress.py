"""Progress reports, sync results, and the bounded pool that runs per-file transfers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOG_EVERY_S = 5.0


@dataclass(frozen=True)
class SyncProgress:
    """A progress report, sent after each file is done or skipped.

    Attributes:
        files_done (int): files finished so far (transferred or skipped).
        files_total (int): files in the sync.
        bytes_done (int): bytes of finished files (transferred or skipped).
        bytes_total (int): bytes of all files.
        path (str): the file just finished, relative to the folder/prefix.
        skipped (bool): whether that file was unchanged and not transferred.
    """

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    path: str
    skipped: bool


ProgressCallback = Callable[[SyncProgress], None]


@dataclass(frozen=True)
class SyncResult:
    """What a sync did.

    Attributes:
        files_total (int): files in the folder/prefix.
        files_transferred (int): files sent or fetched.
        files_skipped (int): files found unchanged.
        bytes_transferred (int): bytes sent or fetched.
        seconds (float): wall time.
    """

    files_total: int
    files_transferred: int
    files_skipped: int
    bytes_transferred: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Throughput of transferred bytes in MB/s (10^6 bytes)."""
        return self.bytes_transferred / 1e6 / self.seconds if self.seconds > 0 else 0.0


class Tracker:
    """Counts finished files and bytes across worker threads; calls the callback and logs progress."""

    def __init__(self, uri: str, files_total: int, bytes_total: int, callback: ProgressCallback | None):
        self.uri, self.files_total, self.bytes_total, self.callback = uri, files_total, bytes_total, callback
        self.files_done = self.bytes_done = self.transferred = self.bytes_transferred = 0
        self.lock = threading.Lock()
        self.last_log = time.monotonic()

    def done(self, path: str, size: int, skipped: bool) -> None:
        with self.lock:
            self.files_done += 1
            self.bytes_done += size
            if not skipped:
                self.transferred += 1
                self.bytes_transferred += size
            report = SyncProgress(
                self.files_done, self.files_total, self.bytes_done, self.bytes_total, path, skipped
            )
            now = time.monotonic()
            if now - self.last_log >= _LOG_EVERY_S:
                self.last_log = now
                logger.info(
                    "%s: %d/%d files, %.1f/%.1f MB",
                    self.uri,
                    report.files_done,
                    report.files_total,
                    report.bytes_done / 1e6,
                    report.bytes_total / 1e6,
                )
            # Called under the lock so that callbacks see reports in order and never run concurrently.
            if self.callback is not None:
                self.callback(report)

    def finish(self, began: float, route: str, verb: str, note: str = "") -> SyncResult:
        """The sync's summary (wall time since ``began``, a ``time.monotonic()``), logged in one line."""
        result = SyncResult(
            self.files_total,
            self.transferred,
            self.files_total - self.transferred,
            self.bytes_transferred,
            time.monotonic() - began,
        )
        logger.info(
            "%s: %d files %s (%.1f MB), %d unchanged, %.1f s%s",
            route,
            result.files_transferred,
            verb,
            result.bytes_transferred / 1e6,
            result.files_skipped,
            result.seconds,
            note,
        )
        return result


def run_all(fn: Callable[[T], None], items: Iterable[T], concurrency: int) -> None:
    """Run ``fn`` on every item on a bounded pool; on the first failure, cancel what has not started and
    raise that failure once the running calls end."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="visionft-sync") as pool:
        futures: list[Future[None]] = [pool.submit(fn, item) for item in items]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()  # type: ignore[misc]
