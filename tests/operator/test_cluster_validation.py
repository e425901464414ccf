"""Admission on the real apiserver: the malformed-spec table is rejected at ``kubectl apply`` (CRD schema or
CEL) with a message naming the field; what CEL can't check (a regex's syntax) the operator flags."""

from __future__ import annotations

import pytest

from tests.api.malformed import MALFORMED, SCHEDULING
from tests.operator.kube import Kube, OperatorProcess
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster


def test_the_valid_spec_is_accepted(kube: Kube, namespace: str) -> None:
    kube.apply(resource("valid", namespace), "--dry-run=server")


@pytest.mark.parametrize(
    ("body", "field"), [(b, f) for _, b, f in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_apiserver_rejects_naming_the_field(kube: Kube, namespace: str, body: dict, field: str) -> None:
    result = kube.apply(resource("malformed", namespace, body), "--dry-run=server", check=False)
    assert result.returncode != 0, f"accepted: {body}"
    assert field in result.stderr, result.stderr


def _pod_with(namespace: str, fields: dict) -> dict:
    """A plain Pod with the scheduling fields, as the core API would get them in the run's pod template."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "scheduling", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], **fields},
    }


@pytest.mark.parametrize(
    ("fields", "core_accepts"), [(f, ok) for _, f, ok in SCHEDULING], ids=[i for i, _, _ in SCHEDULING]
)
def test_the_crd_takes_the_scheduling_fields_the_core_api_takes(
    kube: Kube, namespace: str, fields: dict, core_accepts: bool
) -> None:
    # The table's verdict is the core API's own...
    core = kube.apply(_pod_with(namespace, fields), "--dry-run=server", check=False)
    assert (core.returncode == 0) == core_accepts, core.stderr
    # ...and the CRD agrees, naming the field when it refuses.
    body = spec(**{f"resources.{name}": value for name, value in fields.items()})
    ours = kube.apply(resource("scheduling", namespace, body), "--dry-run=server", check=False)
    assert (ours.returncode == 0) == core_accepts, ours.stderr
    if not core_accepts:
        assert "spec.resources." in ours.stderr, ours.stderr


def test_operator_flags_what_cel_cannot_check(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    kube.apply(resource("bad-regex", namespace, spec(**{"lora.targetModulesRegex": "(["})))
    obj = kube.wait_phase("bad-regex", namespace, "Failed", timeout=30)
    assert "spec.lora" in obj["status"]["message"] and "targetModulesRegex" in obj["status"]["message"]
    stalled = {c["type"]: c for c in obj["status"]["conditions"]}["Stalled"]
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert kube.get("job", "bad-regex-trainer", namespace) is None


def test_immutable_fields_are_mutable_before_start(kube: Kube, namespace: str) -> None:
    # Before training started (no status.startTime) the recipe may still change...
    kube.apply(resource("editable", namespace, spec(suspend=True)))  # suspended: no Job, no start
    kube.patch("vft", "editable", namespace, {"spec": {"training": {"maxSteps": 50}}})
    # ...and once status.startTime is set, it may not.
    kube.patch(
        "vft",
        "editable",
        namespace,
        {"status": {"startTime": "2026-11-26T10:00:00Z"}},
        "--subresource=status",
    )
    result = kube.patch(
        "vft", "editable", namespace, {"spec": {"model": {"uri": "s3://models/other/"}}}, check=False
    )
    assert result.returncode != 0 and "spec.model is immutable once training has started" in result.stderr, (
        result.stderr
    )
    result = kube.patch(
        "vft", "editable", namespace, {"spec": {"image": "ghcr.io/visionft/trainer:other"}}, check=False
    )
    assert result.returncode != 0 and "spec.image" in result.stderr, result.stderr
    # Kueue acts on the queue of a Job once: a queueName edit after the start would do nothing.
    result = kube.patch("vft", "editable", namespace, {"spec": {"queueName": "other-queue"}}, check=False)
    assert result.returncode != 0 and "spec.queueName is immutable" in result.stderr, result.stderr
    kube.patch(
        "vft",
        "editable",
        namespace,
        {"spec": {"suspend": True, "runPolicy": {"ttlSecondsAfterFinished": 60}}},
    )
