"""The operator's settings, read once from environment variables (crate-operator style).

Every attribute is documented with a ``#:`` comment and named after its variable, ``VISIONFT_<ATTRIBUTE>``.
Command-line options of ``visionft-operator`` override the namespace and peering settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field


def _bool(value: str) -> bool:
    if value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if value.strip().lower() in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.replace(",", " ").split() if item.strip()]


@dataclass
class Config:
    """All settings of one operator process."""

    #: The trainer image used when a VisionFineTune sets no ``spec.image``.
    trainer_image: str = "ghcr.io/visionft/trainer:0.1.0"
    #: Namespaces to watch (comma or space separated); empty means the whole cluster.
    namespaces: list[str] = field(default_factory=list)
    #: Whether several replicas coordinate through Kopf peering (needs the kopf.dev peering CRDs).
    peering: bool = False
    #: The Kopf peering object's name, when peering is on.
    peering_name: str = "visionft-operator"
    #: This replica's peering priority; 0 picks a random one, so that replicas never tie (Kopf pauses
    #: all replicas of equal priority).
    peering_priority: int = 0
    #: Seconds after its last keep-alive that a silent peer counts as dead (Kopf's peering lifetime).
    peering_lifetime: int = 60
    #: Port of the liveness endpoint (``/healthz``); 0 turns it off.
    liveness_port: int = 8080
    #: Port of the Prometheus metrics endpoint (``/metrics``); 0 turns it off.
    metrics_port: int = 9090
    #: Address the metrics endpoint listens on (0.0.0.0: every interface, as a Service needs; 127.0.0.1
    #: keeps it on the host).
    metrics_bind_address: str = "0.0.0.0"
    #: Server-side watch timeout in seconds (the apiserver ends the watch; Kopf reconnects).
    watch_server_timeout: int = 300
    #: Client-side watch timeout in seconds, a little above the server's, for dead connections.
    watch_client_timeout: int = 330
    #: How many resources are reconciled at once: the workers of the work queue. Events only queue the
    #: resource's key; one resource is never reconciled by two workers at once. Each worker's API calls
    #: run in a thread of their own.
    workers: int = 4
    #: How often, in seconds, every unfinished resource is reconciled again from the cache (a ResourceQuota
    #: that blocks the pods, a policy change, a missed wake-up). Failed reconciles don't wait for it: they
    #: are retried with a backoff from 0.5 s to 2 min.
    resync_seconds: float = 30.0
    #: The lowest level of log records that Kopf also posts as Kubernetes Events (the operator's own
    #: phase-transition Events are always posted).
    posting_level: str = "WARNING"
    #: Log format: json (one object per line) or text.
    log_format: str = "json"
    #: Log level.
    log_level: str = "INFO"
    #: Size limit of the pod's /tmp emptyDir.
    tmp_size: str = "4Gi"
    #: Size limit of the pod's /dev/shm (memory-backed, for data-loader workers).
    shm_size: str = "8Gi"
    #: Extra annotations on every training pod, as a JSON object (e.g. an autoscaler's safe-to-evict hint).
    pod_annotations: str = ""
    #: The per-namespace policy as YAML or JSON (see ``policy.py``); empty means no limits.
    policy: str = ""
    #: A file with the policy, read when ``policy`` is empty (e.g. a mounted ConfigMap).
    policy_file: str = ""

    def pod_annotation_map(self) -> dict[str, str]:
        if not self.pod_annotations.strip():
            return {}
        value = json.loads(self.pod_annotations)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("VISIONFT_POD_ANNOTATIONS must be a JSON object of strings")
        return {str(k): v for k, v in value.items()}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every ``VISIONFT_*`` variable that is set; the rest keep their defaults."""
        env = os.environ if env is None else env
        config = cls()
        for name, current in list(vars(config).items()):
            raw = env.get(f"VISIONFT_{name.upper()}")
            if raw is None:
                continue
            if isinstance(current, bool):
                value: object = _bool(raw)
            elif isinstance(current, int):
                value = int(raw)
            elif isinstance(current, float):
                value = float(raw)
            elif isinstance(current, list):
                value = _list(raw)
            else:
                value = raw
            setattr(config, name, value)
        return config
