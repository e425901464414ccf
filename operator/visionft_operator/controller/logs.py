"""Structured logs: one JSON object per line, with the resource's namespace and name when Kopf knows them."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Kopf's own plumbing on its per-object records: the object reference (written as namespace/name/kind
# below), the operator's whole settings object (about 2 KB of repr on every line) and a posting flag.
_KOPF_PLUMBING = {"k8s_ref", "settings", "k8s_skip"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Kopf's per-object loggers carry the object's identity in ``k8s_ref``.
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            entry["namespace"] = ref.get("namespace")
            entry["name"] = ref.get("name")
            entry["kind"] = ref.get("kind")
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _KOPF_PLUMBING and not key.startswith("_"):
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    value = repr(value)
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Kopf adds its own handler unless told otherwise; ours replaces it.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
