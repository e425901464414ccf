"""Pytest fixtures for the real Kubernetes control plane (see tests/harness/kube.py).

- `control_plane` (session): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
  with two fake 8-GPU nodes. Fails, never skips, when the binaries are not built.
- `kubeconfig` (session): the admin kubeconfig's path.
- `kube_client` (session): the admin `kubernetes.client.ApiClient`.
- `namespace` (function): a fresh namespace per test, with its `default` ServiceAccount, deleted after.

When a test that uses the control plane fails, the tails of the components' logs are added to its
report (section "control plane logs").
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.kube import BUILD_SCRIPT, ControlPlane, ControlPlaneError, missing_binaries

PlaneT = TypeVar("PlaneT", bound=ControlPlane)


def run_control_plane(plane: PlaneT, label: str) -> Iterator[PlaneT]:
    """Start `plane`, yield it, stop it: the body of every control-plane fixture. Fails (never skips) with
    the build command when the binaries are missing, or with the reason when the plane can't start."""
    missing = missing_binaries()
    if missing:
        pytest.fail(
            f"the test control plane needs {', '.join(missing)}; build them with `{BUILD_SCRIPT}` "
            "(README command 1 runs it)",
            pytrace=False,
        )
    try:
        report = plane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the {label} did not start: {exc}", pytrace=False)
    print(f"\n{label} at {plane.server} started in {report}")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The session's control plane; fails with the build command when the binaries are missing."""
    yield from run_control_plane(ControlPlane(), "Kubernetes test control plane")


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    """Path of the admin kubeconfig of the session's control plane."""
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def kube_client(control_plane: ControlPlane) -> Any:
    """The admin `kubernetes.client.ApiClient` of the session's control plane."""
    return control_plane.client()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new namespace named after the test, ready for pods (its `default` ServiceAccount exists)."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.client())
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{stem or 't'}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"visionft.io/test": "true"}}})
    deadline = time.monotonic() + 30
    while True:  # pods are refused until the service-account controller made `default`
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.exceptions.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report carries the log tails of every control plane it used (a real node's too)."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, ControlPlane):
                report.sections.append((f"{name}: control plane logs", value.log_tails(lines=25)))
    return report
