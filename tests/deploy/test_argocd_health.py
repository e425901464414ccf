"""The Argo CD health check (deploy/argocd/health.lua), run under a real Lua interpreter (lupa).

Argo CD evaluates health checks with gopher-lua, a Lua 5.1; the tests run the script under lupa's Lua 5.1
where the wheel ships it, and under its default Lua as well, against one sample object per phase and the
edge cases around them (stale observedGeneration, Stalled while Pending, suspend requested).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from visionft_api import PHASES
from visionft_api import conditions as cond

from tests.operator.objects import STATES, derived_resource

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "deploy" / "argocd" / "health.lua"
ARGOCD_CM = REPO / "deploy" / "argocd" / "argocd-cm-health.yaml"
HEALTH_KEY = "resource.customizations.health.visionft.io_VisionFineTune"

lupa = pytest.importorskip("lupa")


def _runtimes() -> list[str]:
    names = []
    for name in ("lupa.lua51", "lupa"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        names.append(name)
    return names


def run_health(obj: dict[str, Any], module: str = "lupa") -> dict[str, str]:
    """Evaluate the health script as Argo CD does: ``obj`` is a global, the chunk returns a table."""
    runtime = importlib.import_module(module).LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(HEALTH_LUA.read_text())
    return {key: result[key] for key in ("status", "message") if result[key] is not None}


def _condition(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "observedGeneration": 1,
        "lastTransitionTime": "2026-11-26T10:00:00Z",
        "reason": reason,
        "message": message,
    }


def sample(phase: str | None, *conditions: dict[str, Any], generation: int = 1, **status: Any) -> dict:
    obj: dict[str, Any] = {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {"name": "latex-ocr", "namespace": "team-a", "generation": generation},
        "spec": {"suspend": False},
    }
    if phase is not None:
        obj["status"] = {"observedGeneration": 1, "phase": phase, "conditions": list(conditions), **status}
    return obj


RECONCILING = _condition(cond.RECONCILING, "True", cond.REASON_TRAINING, "training")
NOT_READY = _condition(cond.READY, "False", cond.REASON_IN_PROGRESS)

# One sample per phase, with the conditions the operator sets in that phase, and the expected health.
PHASE_SAMPLES: dict[str, tuple[dict, str]] = {
    "Pending": (sample("Pending", NOT_READY, RECONCILING), "Progressing"),
    "Queued": (
        sample(
            "Queued",
            NOT_READY,
            RECONCILING,
            _condition(cond.ADMITTED, "False", cond.REASON_QUEUED_BY_KUEUE, "waiting in LocalQueue gpu"),
            message="waiting for Kueue admission in LocalQueue gpu",
        ),
        "Progressing",
    ),
    "Initializing": (sample("Initializing", NOT_READY, RECONCILING), "Progressing"),
    "Training": (
        sample(
            "Training",
            NOT_READY,
            RECONCILING,
            progress={"step": 12, "totalSteps": 30, "summary": "12/30 (40%)", "loss": 1.83, "eta": "1m35s"},
        ),
        "Progressing",
    ),
    "Uploading": (sample("Uploading", NOT_READY, RECONCILING), "Progressing"),
    "Succeeded": (
        sample(
            "Succeeded",
            _condition(cond.READY, "True", cond.REASON_SUCCEEDED, "adapter published"),
            _condition(cond.COMPLETE, "True", cond.REASON_SUCCEEDED),
            _condition(cond.RECONCILING, "False", cond.REASON_SUCCEEDED),
            outputs={"adapterUri": "s3://outputs/team-a/latex-ocr/adapter/"},
        ),
        "Healthy",
    ),
    "Failed": (
        sample(
            "Failed",
            _condition(cond.READY, "False", cond.REASON_BACKOFF_LIMIT),
            _condition(cond.STALLED, "True", cond.REASON_BACKOFF_LIMIT, "pod OOMKilled 4 times"),
            _condition(cond.FAILED, "True", cond.REASON_BACKOFF_LIMIT, "pod OOMKilled 4 times"),
        ),
        "Degraded",
    ),
    "Suspended": (
        sample(
            "Suspended",
            NOT_READY,
            _condition(cond.ADMITTED, "False", cond.REASON_SUSPENDED, "spec.suspend is true"),
        ),
        "Suspended",
    ),
}


def test_every_phase_of_the_schema_has_a_sample() -> None:
    assert set(PHASE_SAMPLES) == set(PHASES)


def test_all_four_argo_statuses_are_reached() -> None:
    assert {expected for _, expected in PHASE_SAMPLES.values()} == {
        "Progressing",
        "Healthy",
        "Degraded",
        "Suspended",
    }


@pytest.mark.parametrize("module", _runtimes())
@pytest.mark.parametrize("phase", list(PHASE_SAMPLES))
def test_phase_maps_to_health(phase: str, module: str) -> None:
    obj, expected = PHASE_SAMPLES[phase]
    health = run_health(obj, module)
    assert health["status"] == expected, health
    assert health["message"]


def test_lua_51_is_among_the_interpreters() -> None:
    # gopher-lua implements Lua 5.1: the check must hold there, not only under a newer Lua.
    assert "lupa.lua51" in _runtimes()


@pytest.mark.parametrize("module", _runtimes())
def test_training_message_shows_progress(module: str) -> None:
    health = run_health(PHASE_SAMPLES["Training"][0], module)
    assert health["message"] == "Training 12/30 (40%), loss 1.83, ETA 1m35s"


@pytest.mark.parametrize("module", _runtimes())
def test_failure_message_carries_reason(module: str) -> None:
    health = run_health(PHASE_SAMPLES["Failed"][0], module)
    assert health["message"] == "BackoffLimitExceeded: pod OOMKilled 4 times"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(sample(None), "Progressing", id="no-status-yet"),
        pytest.param(
            sample("Succeeded", _condition(cond.READY, "True", cond.REASON_SUCCEEDED), generation=2),
            "Progressing",
            id="generation-not-observed",
        ),
        pytest.param(
            sample(
                "Pending",
                NOT_READY,
                _condition(cond.STALLED, "True", cond.REASON_MISSING_SECRET, "Secret s3-creds not found"),
            ),
            "Degraded",
            id="stalled-while-pending",
        ),
        pytest.param(
            {**sample("Training", NOT_READY, RECONCILING), "spec": {"suspend": True}},
            "Progressing",
            id="suspend-requested",
        ),
        pytest.param(sample("Exploded"), "Unknown", id="unknown-phase"),
    ],
)
def test_edge_cases(obj: dict, expected: str) -> None:
    assert run_health(obj)["status"] == expected


def test_argocd_cm_snippet_embeds_the_script_verbatim() -> None:
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][HEALTH_KEY] == HEALTH_LUA.read_text()


@pytest.mark.parametrize(
    ("inputs", "expected"), [(i, a) for _, i, _, _, a in STATES], ids=[s[0] for s in STATES]
)
def test_each_derived_state_reads_right(inputs: dict, expected: str) -> None:
    # The statuses the operator really writes, for every phase and every run that can't start.
    body, derived = derived_resource(inputs)
    health = run_health(body, "lupa.lua51")
    assert health["status"] == expected, health
    if expected == "Healthy":
        return
    assert derived.status["message"] in health["message"], health
    if derived.status["phase"] == "Pending":
        # Why a Pending run waits (or is stuck) leads the message: Unschedulable, ChildRejected, ...
        ready = next(c for c in derived.status["conditions"] if c["type"] == cond.READY)
        assert ready["reason"] in health["message"], health
