"""Fuzzing against the real apiserver (issue 8): a sample of hypothesis-mutated specs goes through
``kubectl apply --dry-run=server``; the apiserver never fails internally, every rejection has a message, and
every spec that the CRD admits is either valid for the operator or flagged by it with a message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from visionft_operator.decision import validate

from tests.api.test_fuzz_spec import mutate, mutations
from tests.operator.kube import Kube
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster


def test_apiserver_and_operator_agree_on_fuzzed_specs(kube: Kube, namespace: str) -> None:
    disagreements: list[str] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutations)
    def check(changes: list[tuple[str, Any]]) -> None:
        body = mutate(spec(), changes)
        result = kube.apply(resource("fuzz", namespace, body), "--dry-run=server", check=False)
        assert "InternalError" not in result.stderr and "Internal error" not in result.stderr, result.stderr
        parsed, error = validate(body)
        if result.returncode != 0:
            assert (
                "spec" in result.stderr
                or "unknown field" in result.stderr
                or "Invalid value" in result.stderr
            ), result.stderr
        elif parsed is None:
            # Admitted by the apiserver, rejected by pydantic: the operator flags it (Failed, InvalidSpec).
            assert error
            disagreements.append(error)

    check()
    print(f"\nadmitted by the CRD but flagged by the operator: {len(disagreements)}: {disagreements[:5]}")
