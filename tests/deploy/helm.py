"""Running helm on the chart, and the value sets the tests render it with."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "visionft"
RELEASE = "visionft"
RELEASE_NAMESPACE = "visionft-system"

# Value sets: the default, and each non-default mode the chart supports.
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["--set", "operator.watchNamespaces={team-a,team-b}"],
    "peering": ["--set", "peering.enabled=true", "--set", "replicaCount=2"],
    "namespaced-peering": [
        "--set",
        "operator.watchNamespaces={team-a,team-b}",
        "--set",
        "peering.enabled=true",
        "--set",
        "replicaCount=2",
    ],
    "monitoring": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prometheus",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.apiServerCIDRs={10.0.0.1/32}",
    ],
    "policy": [
        "--set-json",
        'operator.policy={"defaults":{"maxGpusPerJob":8,"allowedImages":["ghcr.io/visionft/"]},'
        '"namespaces":{"team-a":{"maxConcurrentJobs":2,"nodeSelector":{"pool":"h100"}}}}',
        "--set",
        "trainer.image.digest=sha256:" + "a" * 64,
    ],
}


def helm_binary() -> str | None:
    """$HELM, then the test cluster's build (.cache/bin/helm), then PATH."""
    for candidate in (os.environ.get("HELM"), str(REPO / ".cache" / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_helm() -> str:
    """The helm binary; fails (never skips, like the control-plane fixture) when it is not built."""
    helm = helm_binary()
    if helm is None:
        pytest.fail(
            "helm is not built: `bash hack/build-test-cluster.sh` (README command 1) builds it", pytrace=False
        )
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/visionft-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/visionft-helm/config",
    }
    result = subprocess.run(
        [require_helm(), *args], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def template(scenario: str, *extra: str, include_crds: bool = False) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *SCENARIOS[scenario], *extra]
    if include_crds:
        args.append("--include-crds")
    return helm(*args).stdout


def rendered(scenario: str, *extra: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(template(scenario, *extra)) if doc]


def find(
    docs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict]:
    return [
        doc
        for doc in docs
        if doc["kind"] == kind
        and (name is None or doc["metadata"]["name"] == name)
        and (namespace is None or doc["metadata"].get("namespace") == namespace)
    ]
