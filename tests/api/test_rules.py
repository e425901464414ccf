"""The malformed-spec table through the pydantic models: each is rejected with a message naming its field
(the same table runs through the real apiserver in tests/operator/test_cluster_validation.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from visionft_api import VisionFineTuneSpec
from visionft_api.recipe import BUILTIN_DATASETS, BUILTIN_MODELS
from visionft_operator.decision import format_validation_error, validate

from tests.api.malformed import MALFORMED, SCHEDULING
from tests.operator.specs import spec


def test_the_base_spec_is_valid() -> None:
    VisionFineTuneSpec.model_validate(spec())


def test_the_table_is_big_enough() -> None:
    assert len(MALFORMED) >= 20


@pytest.mark.parametrize(
    ("body", "field"), [(b, f) for _, b, f in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_pydantic_rejects_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        VisionFineTuneSpec.model_validate(body)
    message = format_validation_error(info.value)
    # pydantic writes list indexes as .0 where the apiserver writes [0].
    assert field.replace("[0]", ".0") in message, message


def test_invalid_regex_is_flagged_by_pydantic_only() -> None:
    # CEL can't check a regular expression's syntax; the operator flags it (Failed, InvalidSpec).
    with pytest.raises(ValidationError) as info:
        VisionFineTuneSpec.model_validate(spec(**{"lora.targetModulesRegex": "(["}))
    assert "lora.targetModulesRegex" in format_validation_error(info.value)


def test_a_generated_model_needs_no_output_and_runs_locally() -> None:
    # The quickstart's shape: builtin:// model and dataset, no output, no bucket, no GPU.
    body = spec(
        output=None,
        storage=None,
        **{"model.uri": "builtin://tiny-qwen2-vl", "dataset.uri": "builtin://shapes"},
    )
    parsed = VisionFineTuneSpec.model_validate(body)
    assert parsed.output is None and not parsed.uses_s3()
    # A generated model may still publish to a bucket.
    VisionFineTuneSpec.model_validate(spec(**{"model.uri": "builtin://tiny-qwen2-vl"}))


@pytest.mark.parametrize(
    ("field", "typo", "allowed"),
    [
        ("model.uri", "builtin://tiny-llama", BUILTIN_MODELS),
        ("dataset.uri", "builtin://mnist", BUILTIN_DATASETS),
    ],
)
def test_an_unknown_builtin_names_the_allowed_ones(field: str, typo: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        VisionFineTuneSpec.model_validate(spec(**{field: typo}))
    message = format_validation_error(info.value)
    assert message.startswith(f"spec.{field}: ") and all(name in message for name in allowed), message


@pytest.mark.parametrize(
    ("fields", "core_accepts"), [(f, ok) for _, f, ok in SCHEDULING], ids=[i for i, _, _ in SCHEDULING]
)
def test_pydantic_takes_the_scheduling_fields_the_core_api_takes(fields: dict, core_accepts: bool) -> None:
    body = spec(**{f"resources.{name}": value for name, value in fields.items()})
    _, error = validate(body)
    if core_accepts:
        assert error is None, error
    else:
        assert error is not None and "spec.resources." in error
