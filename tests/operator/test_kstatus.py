"""kstatus conformance: for each phase and each stuck state the operator derives, the status that
sigs.k8s.io/cli-utils' kstatus computes (the checker built by hack/build-test-cluster.sh) is the right
one. Only a finished, successful run is Current; a run that cannot start is never Current: Failed when it
needs a person, InProgress while it may still start by itself (a node, quota or a slot to free up). A
suspended run is InProgress too: it has not done what it is for."""

from __future__ import annotations

import pytest

from tests.harness.kstatus import kstatus
from tests.operator.objects import COMPLETE, STATES, derived_resource, job


@pytest.mark.parametrize(
    ("inputs", "phase", "wanted"), [(i, p, k) for _, i, p, k, _ in STATES], ids=[s[0] for s in STATES]
)
def test_kstatus_reads_each_phase_and_stuck_state_right(inputs: dict, phase: str, wanted: str) -> None:
    body, derived = derived_resource(inputs)
    assert derived.status["phase"] == phase
    (verdict,) = kstatus(body)
    assert verdict["status"] == wanted, verdict
    if wanted != "Current":
        # What kstatus-based tools show is the operator's own explanation.
        assert verdict["message"] == derived.status["message"], verdict


def test_a_status_behind_the_spec_is_in_progress_whatever_it_says() -> None:
    body, _ = derived_resource({"job": job(conditions=COMPLETE, succeeded=1)}, generation=4)
    (verdict,) = kstatus(body)
    assert verdict["status"] == "InProgress", verdict


def test_the_checker_reads_a_list_in_one_call() -> None:
    # Guards the checker: a List in, one verdict per item out, in order.
    bodies = []
    for name, inputs, *_ in STATES[:3]:
        body, _ = derived_resource(inputs)
        body["metadata"]["name"] = name
        bodies.append(body)
    assert [v["name"] for v in kstatus(*bodies)] == [s[0] for s in STATES[:3]]
