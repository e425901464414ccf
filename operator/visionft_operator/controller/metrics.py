"""Prometheus metrics in the text exposition format, without a client library (the operator's only
dependencies are Kopf and the kubernetes client).

- ``visionft_resources{phase}``: VisionFineTunes by phase (a gauge, from the operator's view);
- ``visionft_handler_duration_seconds{handler}``: a histogram of handler durations (the event handlers,
  which only queue a key, and ``reconcile``, one reconcile of a resource by a worker);
- ``visionft_handler_errors_total{handler}``: handler errors;
- ``visionft_transitions_total{phase}``: phase transitions observed;
- ``visionft_workqueue_depth``: resources waiting for a worker;
- ``visionft_workqueue_retries_total``: failed reconciles queued again after a backoff.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Registry:
    """All metrics of the process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}
        self.errors: dict[str, int] = defaultdict(int)
        self.transitions: dict[str, int] = defaultdict(int)
        self.durations: dict[str, list[int]] = {}
        self.duration_sum: dict[str, float] = defaultdict(float)
        self.duration_count: dict[str, int] = defaultdict(int)
        self.retries = 0
        self._depth: Callable[[], int] = lambda: 0

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report the work queue's depth from this function."""
        self._depth = depth

    def retry(self) -> None:
        with self._lock:
            self.retries += 1

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            key = (namespace, name)
            if phase is None:
                self.phases.pop(key, None)
            else:
                if self.phases.get(key) != phase:
                    self.transitions[phase] += 1
                self.phases[key] = phase

    def error(self, handler: str) -> None:
        with self._lock:
            self.errors[handler] += 1

    def observe(self, handler: str, seconds: float) -> None:
        with self._lock:
            counts = self.durations.setdefault(handler, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.duration_sum[handler] += seconds
            self.duration_count[handler] += 1

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.error(handler)
            raise
        finally:
            self.observe(handler, time.perf_counter() - start)

    def render(self) -> str:
        """The text exposition format (version 0.0.4)."""
        from visionft_api.resource import PHASES

        with self._lock:
            lines = [
                "# HELP visionft_resources VisionFineTune resources by phase.",
                "# TYPE visionft_resources gauge",
            ]
            by_phase: dict[str, int] = defaultdict(int)
            for phase in self.phases.values():
                by_phase[phase] += 1
            for phase in PHASES:
                lines.append(f'visionft_resources{{phase="{phase}"}} {by_phase.get(phase, 0)}')
            lines += [
                "# HELP visionft_transitions_total Phase transitions observed by the operator.",
                "# TYPE visionft_transitions_total counter",
            ]
            for phase, count in sorted(self.transitions.items()):
                lines.append(f'visionft_transitions_total{{phase="{phase}"}} {count}')
            lines += [
                "# HELP visionft_handler_errors_total Handler invocations that raised.",
                "# TYPE visionft_handler_errors_total counter",
            ]
            for handler in sorted(set(self.errors) | set(self.duration_count)):
                lines.append(
                    f'visionft_handler_errors_total{{handler="{handler}"}} {self.errors.get(handler, 0)}'
                )
            lines += [
                "# HELP visionft_workqueue_depth Resources waiting for a worker.",
                "# TYPE visionft_workqueue_depth gauge",
                f"visionft_workqueue_depth {self._depth()}",
                "# HELP visionft_workqueue_retries_total Failed reconciles queued again after a backoff.",
                "# TYPE visionft_workqueue_retries_total counter",
                f"visionft_workqueue_retries_total {self.retries}",
                "# HELP visionft_handler_duration_seconds Handler durations.",
                "# TYPE visionft_handler_duration_seconds histogram",
            ]
            for handler in sorted(self.durations):
                for bound, count in zip(BUCKETS, self.durations[handler]):
                    lines.append(
                        f'visionft_handler_duration_seconds_bucket{{handler="{handler}",le="{bound}"}} {count}'
                    )
                total = self.duration_count[handler]
                lines.append(
                    f'visionft_handler_duration_seconds_bucket{{handler="{handler}",le="+Inf"}} {total}'
                )
                lines.append(
                    f'visionft_handler_duration_seconds_sum{{handler="{handler}"}} {self.duration_sum[handler]:.6f}'
                )
                lines.append(f'visionft_handler_duration_seconds_count{{handler="{handler}"}} {total}')
            return "\n".join(lines) + "\n"


REGISTRY = Registry()


async def serve(port: int, host: str = "0.0.0.0") -> object:
    """Start the /metrics endpoint on aiohttp (already a Kopf dependency); returns the runner."""
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=REGISTRY.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
