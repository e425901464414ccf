"""kstatus as sigs.k8s.io/cli-utils computes it, from the checker ``hack/build-test-cluster.sh`` builds
(``hack/kstatus/main.go``): what Flux, kpt and other kstatus-based tools make of an object."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tests.harness.kube import BIN_DIR, BUILD_SCRIPT


def kstatus(*objects: dict[str, Any]) -> list[dict[str, str]]:
    """{"name", "status", "message"} of each object: status is Current, InProgress, Failed, Terminating
    or Unknown."""
    binary = BIN_DIR / "kstatus"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"the kstatus checker is not built in {BIN_DIR}; run `bash {BUILD_SCRIPT}`")
    result = subprocess.run(
        [str(binary)],
        input=json.dumps({"items": list(objects)}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kstatus failed ({result.returncode}): {result.stderr.strip()}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def kstatus_of(obj: dict[str, Any]) -> str:
    """One object's kstatus."""
    (verdict,) = kstatus(obj)
    return verdict["status"]
