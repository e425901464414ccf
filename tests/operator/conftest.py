"""Fixtures of the operator's cluster tests: the CRD on the session's control plane, one namespace per test
module, and the real ``visionft-operator`` process watching it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.kube import CRD, Kube, OperatorProcess, wait_for


def _kubeconfig_of(control_plane: object) -> str:
    for attr in ("kubeconfig", "kubeconfig_path", "admin_kubeconfig"):
        value = getattr(control_plane, attr, None)
        if value:
            return str(value)
    raise AssertionError(f"can't find the kubeconfig of {control_plane!r}")


@pytest.fixture(scope="session")
def kube(control_plane: object) -> Kube:
    """kubectl as the cluster admin, with the VisionFineTune CRD installed and established."""
    k = Kube(_kubeconfig_of(control_plane))
    k.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # (``kubectl wait`` errors out while the CRD has no status yet, so poll.)
    wait_for(
        lambda: (
            k.run(
                "get",
                "crd",
                "visionfinetunes.visionft.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                check=False,
            ).stdout.strip()
            == "True"
        ),
        timeout=60,
        what="the CRD Established",
    )
    # Discovery can lag the Established condition by a moment.
    wait_for(lambda: k.run("get", "vft", "-A", check=False).returncode == 0, timeout=30, what="the vft API")
    return k


def _module_namespace(request: pytest.FixtureRequest) -> str:
    return "vft-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_cluster_").replace("_", "-")


@pytest.fixture(scope="module")
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    ns = kube.namespace(_module_namespace(request))
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": ns},
            "stringData": {
                "AWS_ACCESS_KEY_ID": "planted-key-id",
                "AWS_SECRET_ACCESS_KEY": "planted-secret-value",
            },
        }
    )
    yield ns
    kube.run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    kube: Kube, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The real operator process, watching only this module's namespace."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(kube.kubeconfig, [namespace], log).start()
    yield proc
    proc.stop()
    print(f"\noperator log: {log}")


def kubectl_json(kube: Kube, *args: str) -> dict:
    return json.loads(kube.run(*args, "-o", "json").stdout)


def python_subprocess(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
