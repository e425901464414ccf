"""The base of every schema model and the helpers the models are declared with (camelCase aliases, CEL
rules), shared by the recipe (``visionft_api.recipe``), its evaluation and tracking parts
(``visionft_api.evaluation``) and the resource (``visionft_api.resource``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.config import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

#: A Kubernetes object name in the same namespace (a DNS subdomain): Secrets, ConfigMaps, classes, queues.
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def to_camel(name: str) -> str:
    """snake_case to the camelCase of Kubernetes APIs, keeping digits with their word (load_in_4bit ->
    loadIn4bit, as the design spells it; pydantic's own helper would give loadIn4Bit)."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CEL validation rule as the CRD expects it."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def field_errors(problems: list[tuple[tuple[str, ...], str]]) -> ValidationError:
    """A validation error with one entry per (location, message), each location the camelCase path under
    the model that raises it: for cross-field rules whose message must name the field they are about rather
    than the model that checks them (pydantic puts the caller's own location in front)."""
    details = [
        InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=None)
        for loc, message in problems
    ]
    return ValidationError.from_exception_data("spec", details)


class SpecModel(BaseModel):
    """Base of every schema model: camelCase in YAML, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_dict(self) -> dict:
        """The camelCase form, as it appears in a resource or a config file, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
