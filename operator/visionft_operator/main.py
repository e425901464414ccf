"""The operator's entry point: registers the handlers with Kopf and runs it.

`visionft-operator [--namespace NS ...] [--peering] [--liveness URL]` runs Kopf with the settings from
`config.Config` (environment variables), overridden by the command line. Handlers live in `handlers/`; this
module only wires them.

What the operator watches: VisionFineTunes (every event: reconcile), and the Jobs and pods it made
(labelled app.kubernetes.io/managed-by=visionft-operator: reconcile their owner). It keeps no state in the
resources (no annotations, no finalizers): every handler is level-triggered and idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any, cast

import kopf
from visionft_api.resource import GROUP, PLURAL, VERSION

from visionft_operator import config as config_mod
from visionft_operator import constants as c
from visionft_operator import logs, metrics, peering
from visionft_operator.handlers.handle_child_event import handle_child_event
from visionft_operator.handlers.handle_resource_event import handle_resource_event
from visionft_operator.handlers.resync import RUNTIME, resync_forever

log = logging.getLogger(__name__)
_background: dict[str, Any] = {}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = config_mod.get()
    settings.watching.server_timeout = cfg.watch_server_timeout
    settings.watching.client_timeout = cfg.watch_client_timeout
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.getLevelName(cfg.posting_level.upper())
    settings.peering.standalone = not cfg.peering
    settings.peering.name = cfg.peering_name
    settings.peering.mandatory = cfg.peering
    settings.peering.lifetime = cfg.peering_lifetime
    settings.peering.clusterwide = not cfg.namespaces
    # No Kopf state in the resources: we register no change-detecting handlers (on.create/on.update), so Kopf
    # writes no annotations and adds no finalizer.
    settings.execution.max_workers = 8
    stopped = asyncio.Event()
    _background["stopped"] = stopped
    _background["resync"] = asyncio.create_task(resync_forever(stopped))
    if cfg.metrics_port:
        _background["metrics"] = await metrics.serve(cfg.metrics_port)
    log.info(
        "visionft-operator started", extra={"namespaces": cfg.namespaces or "all", "peering": cfg.peering}
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if "stopped" in _background:
        _background["stopped"].set()
        await asyncio.gather(_background.pop("resync"), return_exceptions=True)
    runner = _background.pop("metrics", None)
    if runner is not None:
        await runner.cleanup()  # type: ignore[attr-defined]


kopf.on.event(GROUP, VERSION, PLURAL, id="resource_event")(handle_resource_event)
kopf.on.event("batch", "v1", "jobs", id="job_event", labels={c.LABEL_MANAGED_BY: c.COMPONENT})(
    handle_child_event
)
kopf.on.event("", "v1", "pods", id="pod_event", labels={c.LABEL_MANAGED_BY: c.COMPONENT})(handle_child_event)


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
    config_mod.set_current(cfg)
    logs.configure(cfg.log_format, cfg.log_level)
    identity = peering.own_identity()
    priority = peering.own_priority(cfg.peering_priority)
    RUNTIME.update(identity=identity, priority=priority)
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
