"""What the operator makes of status.evaluation (no cluster): the Degraded condition once the output is
evaluated, the failure that spec.evaluation.failIfWorseThanBase asks for, and one NewBestMetric Event per
new best step."""

from __future__ import annotations

from typing import Any

from visionft_api import conditions as cond
from visionft_operator import status as st

from tests.operator.specs import spec

T1 = "2026-11-26T10:05:00Z"
COMPLETE = {
    "metadata": {"name": "r-trainer"},
    "spec": {},
    "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1},
}
FAILED_EXIT_3 = {
    "metadata": {"name": "r-trainer"},
    "spec": {},
    "status": {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 3"}
        ],
        "failed": 1,
    },
}
RUNNING = {"metadata": {"name": "r-trainer"}, "spec": {}, "status": {"active": 1}}
POD = {"metadata": {"name": "r-trainer-abc", "creationTimestamp": T1}, "status": {"phase": "Running"}}


def evaluation(base: float, final: float | None = None, best: tuple[int, float] | None = None) -> dict:
    out: dict[str, Any] = {
        "metric": "cer",
        "higherIsBetter": False,
        "base": {"step": 0, "value": base, "values": {"cer": base}},
    }
    if final is not None:
        out["final"] = {"step": 30, "value": final, "values": {"cer": final}}
    if best is not None:
        out["best"] = {"step": best[0], "value": best[1], "metric": "cer", "values": {"cer": best[1]}}
    return out


def derive(status: dict[str, Any], job: dict[str, Any], body_spec: dict[str, Any] | None = None, pods=()):
    obs = st.Observation(generation=1, spec=body_spec or spec(), status=status, job=job, pods=list(pods))
    return st.derive(obs, now=T1)


def condition(derived: st.Derived, type_: str) -> dict[str, Any] | None:
    return st.get_condition(derived.status["conditions"], type_)


def test_no_degraded_condition_before_the_output_is_evaluated() -> None:
    d = derive({"evaluation": evaluation(0.9)}, RUNNING, pods=[POD])
    assert condition(d, cond.DEGRADED) is None


def test_an_improved_run_succeeds_and_is_not_degraded() -> None:
    d = derive({"evaluation": evaluation(0.9, final=0.1)}, COMPLETE)
    assert d.status["phase"] == "Succeeded"
    degraded = condition(d, cond.DEGRADED)
    assert degraded is not None and degraded["status"] == "False"
    assert degraded["reason"] == cond.REASON_NOT_WORSE_THAN_BASE


def test_a_worse_run_is_degraded_and_still_succeeds_unless_told_to_fail() -> None:
    d = derive({"evaluation": evaluation(0.3, final=0.4)}, COMPLETE)
    assert d.status["phase"] == "Succeeded"
    degraded = condition(d, cond.DEGRADED)
    assert degraded is not None and degraded["status"] == "True"
    assert degraded["reason"] == cond.REASON_WORSE_THAN_BASE and "worse than the base" in degraded["message"]


def test_fail_if_worse_than_base_fails_the_run_with_its_reason() -> None:
    asks = spec(**{"evaluation": {"metrics": ["cer"], "failIfWorseThanBase": True}})
    # The trainer exits 3 (non-retryable: the Job fails at once) after publishing its outputs.
    for job in (FAILED_EXIT_3, COMPLETE):
        d = derive({"evaluation": evaluation(0.3, final=0.4)}, job, asks)
        assert d.status["phase"] == "Failed", job
        assert d.status["message"].startswith("the output's cer 0.4 is worse than the base model's 0.3")
        stalled = condition(d, cond.STALLED)
        assert stalled is not None and stalled["reason"] == cond.REASON_WORSE_THAN_BASE
        assert d.status["outputs"]["adapterUri"].endswith("/adapter/")  # published, for a look
    # An equal value is not worse.
    same = derive({"evaluation": evaluation(0.3, final=0.3)}, COMPLETE, asks)
    assert same.status["phase"] == "Succeeded"


def test_one_event_per_new_best_step() -> None:
    first = derive({"evaluation": evaluation(0.9, best=(10, 0.5))}, RUNNING, pods=[POD])
    assert first.evaluation_event == (
        "Normal",
        cond.REASON_NEW_BEST_METRIC,
        "new best cer 0.5 at step 10 (base model 0.9)",
    )
    assert first.status["announcedBestStep"] == 10
    # The operator's own write comes back: the same best is not announced again.
    again = derive(
        {"evaluation": evaluation(0.9, best=(10, 0.5)), "announcedBestStep": 10}, RUNNING, pods=[POD]
    )
    assert again.evaluation_event is None and "announcedBestStep" not in again.status
    later = derive(
        {"evaluation": evaluation(0.9, best=(20, 0.2)), "announcedBestStep": 10}, RUNNING, pods=[POD]
    )
    assert later.evaluation_event is not None and "step 20" in later.evaluation_event[2]
