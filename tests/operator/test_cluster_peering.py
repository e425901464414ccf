"""Several replicas with Kopf peering: only the highest-priority one acts (one Job per resource, no
status fights); when it dies, another takes over after the peering lifetime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.kube import REPO, Kube, OperatorProcess, wait_for
from tests.operator.specs import resource

pytestmark = pytest.mark.cluster

PEERING_CRDS = REPO / "charts" / "visionft" / "crds" / "kopf.dev_peerings.yaml"


@pytest.fixture(scope="module")
def replicas(
    kube: Kube, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[OperatorProcess]]:
    kube.run("apply", "--server-side", "-f", str(PEERING_CRDS))
    wait_for(
        lambda: kube.run("get", "kopfpeerings", "-n", namespace, check=False).returncode == 0,
        timeout=30,
        what="peering CRD",
    )
    kube.apply(
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "visionft-operator", "namespace": namespace},
        }
    )
    logs: Path = tmp_path_factory.mktemp("replicas")
    procs = [
        OperatorProcess(
            kube.kubeconfig,
            [namespace],
            logs / f"replica-{prio}.log",
            args=["--peering"],
            env={"VISIONFT_PEERING_PRIORITY": str(prio), "VISIONFT_PEERING_LIFETIME": "5"},
        ).start()
        for prio in (100, 50)
    ]
    yield procs
    for proc in procs:
        proc.stop()


def test_only_the_leader_acts_and_a_follower_takes_over(
    kube: Kube, namespace: str, replicas: list[OperatorProcess]
) -> None:
    leader, follower = replicas
    # Both replicas are peers; the follower's streams stay paused while the leader lives.
    wait_for(
        lambda: "Keep-alive" in follower.logs() and "Keep-alive" in leader.logs(), timeout=30, what="peering"
    )
    kube.apply(resource("peer-a", namespace))
    kube.wait_pod("peer-a", namespace)
    kube.wait_phase("peer-a", namespace, "Initializing")
    assert [j["metadata"]["name"] for j in kube.list("jobs", namespace)] == ["peer-a-trainer"]
    assert "peer-a" in leader.logs()
    follower_actions = [
        line for line in follower.logs().splitlines() if "created Job" in line or "patching Job" in line
    ]
    assert not follower_actions, follower_actions
    # The leader dies without saying goodbye; after the peering lifetime the follower resumes.
    leader.kill()
    kube.apply(resource("peer-b", namespace))
    kube.wait_pod("peer-b", namespace, timeout=90)
    kube.wait_phase("peer-b", namespace, "Initializing", timeout=30)
    assert sorted(j["metadata"]["name"] for j in kube.list("jobs", namespace)) == [
        "peer-a-trainer",
        "peer-b-trainer",
    ]
