"""Pytest fixtures for the real node (see tests/harness/node.py) and the images it runs.

- `built_images` (session): the images of `hack/build-images.sh`, present in podman's storage.
- `node_plane` (session): a `NodeControlPlane`: etcd, kube-apiserver on the pod network's gateway,
  controller manager, scheduler, kwok with two tainted fake 8-GPU nodes, and the real node.
- `gateway_s3` (session): a SeaweedFS S3 server listening on that gateway, reachable from the pods.

Tests marked `node` use them. They skip only where a real node cannot exist on the machine (not Linux, not
root, Debian's container packages missing; `node_unavailable()` says which), and never on CI (`CI` set),
where the node must run. Missing binaries or images fail with the command that builds them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.harness.kube import BUILD_SCRIPT
from tests.harness.kube_fixtures import run_control_plane
from tests.harness.node import (
    IMAGES_SCRIPT,
    Images,
    NodeControlPlane,
    missing_node_binaries,
    node_unavailable,
)
from tests.harness.s3 import SeaweedS3
from tests.harness.s3_fixtures import run_s3


def require_real_node() -> None:
    """Skip where no real node can run here, fail on CI; see the module docstring."""
    reason = node_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the real node, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def built_images() -> Images:
    """The built images; fails with the build command when they are missing."""
    require_real_node()
    try:
        images = Images.load()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    missing = images.missing()
    if missing:
        pytest.fail(f"podman's storage lacks {', '.join(missing)}: run `{IMAGES_SCRIPT}`", pytrace=False)
    return images


@pytest.fixture(scope="session")
def node_plane(built_images: Images) -> Iterator[NodeControlPlane]:
    """The session's control plane with a real node; fails with the build command when binaries are missing."""
    missing = missing_node_binaries()
    if missing:
        pytest.fail(
            f"the real node needs {', '.join(missing)}; build them with `{BUILD_SCRIPT}`", pytrace=False
        )
    yield from run_control_plane(NodeControlPlane(images=built_images), "control plane with a real node")


@pytest.fixture(scope="session")
def gateway_s3(node_plane: NodeControlPlane) -> Iterator[SeaweedS3]:
    """An S3 server on the pod network's gateway, for pods to read inputs from and publish to."""
    yield from run_s3(
        lambda: SeaweedS3(host=node_plane.network.gateway), "S3 server (SeaweedFS) for the pods"
    )
