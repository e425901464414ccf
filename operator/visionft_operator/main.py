"""The operator's entry point: registers the handlers with Kopf and runs it.

``visionft-operator [--namespace NS ...] [--peering] [--liveness URL]`` runs Kopf with the settings from
``config.Config`` (environment variables), overridden by the command line. Handlers live in ``handlers/``; this
module only wires them to one ``Operator``, which holds the process's cache, work queue and reconciler.

How it is built, in the manner of controller-runtime: Kopf watches VisionFineTunes and the Jobs and pods the
operator made (labelled app.kubernetes.io/managed-by=visionft-operator, selected on the server). The event
handlers put a slim copy of the object into the operator's cache (``controller/cache.py``, which also lists
everything once before the workers start) and the VisionFineTune's key into a de-duplicating work queue
(``controller/workqueue.py``); ``Config.workers`` workers reconcile the keys from the cache (``reconciler.py``,
which asks ``decision.py`` what to do), retrying failures with a backoff, and a periodic resync queues the
unfinished resources again. It keeps no state in the resources (no annotations, no finalizers): every
reconcile is level-triggered and idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
from visionft_api.resource import GROUP, PLURAL, VERSION

from visionft_operator import config as config_mod
from visionft_operator import constants as c
from visionft_operator.controller import logs, metrics, peering
from visionft_operator.controller.cache import Cache
from visionft_operator.controller.metrics import REGISTRY
from visionft_operator.controller.workqueue import WorkQueue, run_worker
from visionft_operator.handlers.handle_child_event import handle_job_event, handle_pod_event
from visionft_operator.handlers.handle_resource_event import handle_resource_event
from visionft_operator.handlers.resync import Peer, resync_forever
from visionft_operator.reconciler import Reconciler

logger = logging.getLogger(__name__)
MANAGED = f"{c.LABEL_MANAGED_BY}={c.COMPONENT}"
#: Objects per page of the initial listings (and of the re-listings after a watch expires): bounds the
#: memory that a listing of thousands of pods takes at once.
LIST_CHUNK = 250
#: Seconds that Kopf keeps an object's idle worker task (and with it the object's last event) after its
#: last event: Kopf's 5 s default holds several thousand bodies at once after a listing.
IDLE_SECONDS = 0.5


class Operator:
    """One operator process: its settings, cache, work queue and reconciler, and the background tasks
    (the cache's lists, the workers, the resync) that run between Kopf's start-up and clean-up."""

    def __init__(self, cfg: config_mod.Config, peer: Peer) -> None:
        self.config = cfg
        self.peer = peer
        self.cache = Cache()
        self.queue = WorkQueue()
        self.reconciler = Reconciler(self.cache, cfg)
        self._background: dict[str, Any] = {}
        REGISTRY.watch_queue(lambda: len(self.queue))

    async def startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        cfg = self.config
        settings.watching.server_timeout = cfg.watch_server_timeout
        settings.watching.client_timeout = cfg.watch_client_timeout
        settings.watching.connect_timeout = 30
        settings.watching.chunk_size = LIST_CHUNK
        settings.queueing.idle_timeout = IDLE_SECONDS
        # Only the operator's own Jobs and pods travel from the apiserver, not every pod of the cluster.
        settings.watching.label_selectors["batch/v1", "jobs"] = MANAGED
        settings.watching.label_selectors["v1", "pods"] = MANAGED
        settings.posting.level = logging.getLevelName(cfg.posting_level.upper())
        settings.peering.standalone = not cfg.peering
        settings.peering.name = cfg.peering_name
        settings.peering.mandatory = cfg.peering
        settings.peering.lifetime = cfg.peering_lifetime
        settings.peering.clusterwide = not cfg.namespaces
        # No Kopf state in the resources: we register no change-detecting handlers (on.create/on.update),
        # so Kopf writes no annotations and adds no finalizer.
        settings.execution.max_workers = 8
        # The workers' blocking API calls (and Event posts) run in the loop's default executor.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=cfg.workers + 4, thread_name_prefix="visionft")
        )
        stopped = asyncio.Event()
        bg = self._background
        bg["stopped"] = stopped
        # The cache lists everything once before the workers start (events queue their keys meanwhile).
        bg["sync"] = asyncio.create_task(self.cache.sync_forever(cfg.namespaces, stopped, self.queue.add))
        bg["workers"] = asyncio.create_task(self._run_workers(max(cfg.workers, 1)))
        bg["resync"] = asyncio.create_task(resync_forever(stopped, self.queue, self.cache, cfg, self.peer))
        if cfg.metrics_port:
            bg["metrics"] = await metrics.serve(cfg.metrics_port, cfg.metrics_bind_address)
        logger.info(
            "visionft-operator started",
            extra={"namespaces": cfg.namespaces or "all", "peering": cfg.peering, "workers": cfg.workers},
        )

    async def _run_workers(self, count: int) -> None:
        await self.cache.synced.wait()
        await asyncio.gather(*(run_worker(self.queue, self.reconciler.reconcile) for _ in range(count)))

    async def cleanup(self, **_: Any) -> None:
        bg = self._background
        if "stopped" in bg:
            bg["stopped"].set()
            await asyncio.gather(bg.pop("resync"), bg.pop("sync"), return_exceptions=True)
        self.queue.shutdown()
        workers = bg.pop("workers", None)
        if workers is not None:
            # A worker finishes the reconcile it is in (its API calls can't be interrupted), then stops.
            _done, pending = await asyncio.wait([workers], timeout=10)
            for task in pending:
                task.cancel()
        runner = bg.pop("metrics", None)
        if runner is not None:
            await runner.cleanup()  # type: ignore[attr-defined]

    async def on_resource_event(self, *, event: Any, body: Any, **_: Any) -> None:
        await handle_resource_event(
            event, body, cache=self.cache, queue=self.queue, reconciler=self.reconciler
        )

    async def on_job_event(self, *, event: Any, body: Any, **_: Any) -> None:
        await handle_job_event(event, body, cache=self.cache, queue=self.queue, reconciler=self.reconciler)

    async def on_pod_event(self, *, event: Any, body: Any, **_: Any) -> None:
        await handle_pod_event(event, body, cache=self.cache, queue=self.queue)


def register(op: Operator) -> None:
    """Register the process's start-up, clean-up and event handlers with Kopf."""
    kopf.on.startup()(op.startup)
    kopf.on.cleanup()(op.cleanup)
    kopf.on.event(GROUP, VERSION, PLURAL, id="resource_event")(op.on_resource_event)
    managed = {c.LABEL_MANAGED_BY: c.COMPONENT}
    kopf.on.event("batch", "v1", "jobs", id="job_event", labels=managed)(op.on_job_event)
    kopf.on.event("", "v1", "pods", id="pod_event", labels=managed)(op.on_pod_event)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="visionft-operator", description="The VisionFT Kopf operator.")
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="watch this namespace (repeatable; globs allowed); default: $VISIONFT_NAMESPACES, else all",
    )
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", action="store_true", help="coordinate several replicas (Kopf peering)")
    peering.add_argument("--standalone", action="store_true", help="no peering (one replica)")
    parser.add_argument(
        "--liveness", default=None, help="liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: off)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.Config.from_env()
    if args.all_namespaces:
        cfg.namespaces = []
    elif args.namespace:
        cfg.namespaces = [ns for item in args.namespace for ns in config_mod._list(item)]
    if args.peering:
        cfg.peering = True
    if args.standalone:
        cfg.peering = False
    if args.metrics_port is not None:
        cfg.metrics_port = args.metrics_port
    return cfg


def liveness_url(cfg: config_mod.Config, override: str | None) -> str | None:
    if override:
        return override
    return f"http://0.0.0.0:{cfg.liveness_port}/healthz" if cfg.liveness_port else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    logs.configure(cfg.log_format, cfg.log_level)
    identity = peering.own_identity()
    priority = peering.own_priority(cfg.peering_priority)
    register(Operator(cfg, Peer(identity=identity, priority=priority)))
    # What is loaded by now lives as long as the process: freeze it out of the cyclic collector's
    # generations, so that full collections come often enough to free, within seconds, the reference
    # cycles that Kopf leaves behind for every watch event (each event's body wrapped in views that point
    # at each other). Otherwise they pile up by the thousand after a listing.
    gc.collect()
    gc.freeze()
    kopf.run(
        identity=cast(Any, identity),
        priority=priority if cfg.peering else None,
        clusterwide=not cfg.namespaces,
        namespaces=cfg.namespaces,
        standalone=not cfg.peering,
        # Naming a peering makes Kopf require its CRD: only when peering is on.
        peering_name=cfg.peering_name if cfg.peering else None,
        liveness_endpoint=liveness_url(cfg, args.liveness),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
