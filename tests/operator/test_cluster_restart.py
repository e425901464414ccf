"""The operator is killed (SIGKILL) mid-run and started again: still one Job, and the status catches up
with what happened while it was down."""

from __future__ import annotations

import pytest

from tests.operator.kube import Kube, OperatorProcess
from tests.operator.specs import resource

pytestmark = pytest.mark.cluster


def test_killed_operator_restarts_without_duplicates(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    names = ["restart-a", "restart-b"]
    for name in names:
        kube.apply(resource(name, namespace))
    pods = {name: kube.wait_pod(name, namespace) for name in names}
    for name in names:
        kube.report_progress(
            name,
            namespace,
            {"step": 2, "totalSteps": 10, "stage": "Training", "loss": 2.0},
            f"{name}-trainer",
        )
        kube.wait_phase(name, namespace, "Training")
    operator.kill()
    # While it is down: one run finishes, the other is suspended by its owner.
    kube.terminate_pod(pods["restart-a"], exit_code=0)
    kube.patch("vft", "restart-b", namespace, {"spec": {"suspend": True}})
    kube.apply(resource("restart-c", namespace))  # and a new one arrives
    operator.start()
    kube.wait_phase("restart-a", namespace, "Succeeded")
    kube.wait_phase("restart-b", namespace, "Suspended")
    kube.wait_pod("restart-c", namespace)
    jobs = kube.list("jobs", namespace)
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "restart-a-trainer",
        "restart-b-trainer",
        "restart-c-trainer",
    ]
    assert kube.get("job", "restart-b-trainer", namespace)["spec"]["suspend"] is True
    for kind in ("configmaps", "serviceaccounts", "roles", "rolebindings"):
        mine = [o for o in kube.list(kind, namespace, "app.kubernetes.io/managed-by=visionft-operator")]
        assert len(mine) == 3, (kind, [o["metadata"]["name"] for o in mine])
    # Restarting again changes nothing (idempotent handlers).
    operator.stop()
    operator.start()
    kube.wait_phase("restart-c", namespace, "Initializing")
    assert len(kube.list("jobs", namespace)) == 3
    assert len(kube.pods("restart-c", namespace)) == 1
