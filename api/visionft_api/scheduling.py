"""Where the training pods may run: tolerations and a node selector, with the core API's own rules.

The operator copies these into the pod template of the run's Job, so whatever the core API would refuse
there must be refused here, at ``kubectl apply``, naming the field: otherwise the resource is accepted and
its Job never is. Each rule is declared twice, as CEL for the apiserver and as a pydantic check for the
operator and trainer (tests/api/malformed.py holds one table of cases for both, and checks it against the
core API's own answer on a Pod).

The CEL rules use only the Regex and Strings libraries, which every Kubernetes the CRD supports (1.30
and newer) has.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from visionft_api.recipe import SpecModel, cel

# A label key (the core API's "qualified name"): an optional DNS-subdomain prefix and "/", then a name of at
# most 63 letters, digits, "-", "_" and ".", beginning and ending with a letter or digit. The prefix's own
# limit, 253 characters, is checked apart: one pattern can't bound two parts.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A label value: empty, or at most 63 letters, digits, "-", "_" and ".", beginning and ending with a letter or
# digit.
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
MAX_PREFIX = 253

LABEL_KEY_MESSAGE = (
    f"must be a label key: an optional DNS-subdomain prefix of at most {MAX_PREFIX} characters and '/', then "
    "at most 63 letters, digits, '-', '_' and '.', beginning and ending with a letter or digit"
)
LABEL_VALUE_MESSAGE = (
    "must be a label value: empty, or at most 63 letters, digits, '-', '_' and '.', beginning and ending "
    "with a letter or digit"
)
_EXISTS_WITH_VALUE = "toleration: value must be empty when operator is Exists (Exists matches any value)"
_EMPTY_KEY = (
    "toleration: operator must be Exists when key is empty (a toleration of every taint): set a key to "
    "use Equal"
)
_SECONDS_WITHOUT_NO_EXECUTE = (
    "toleration: tolerationSeconds needs effect NoExecute (only a NoExecute taint evicts a running pod)"
)


def is_label_key(key: str) -> bool:
    return re.fullmatch(LABEL_KEY_PATTERN, key) is not None and (
        "/" not in key or key.index("/") <= MAX_PREFIX
    )


def is_label_value(value: str) -> bool:
    return re.fullmatch(LABEL_VALUE_PATTERN, value) is not None


def _label_key_rule(var: str) -> str:
    """CEL: ``var`` is a label key."""
    return (
        f"{var}.matches(r'{LABEL_KEY_PATTERN}') && "
        f"(!{var}.contains('/') || {var}.indexOf('/') <= {MAX_PREFIX})"
    )


def _label_key(key: str) -> str:
    if not is_label_key(key):
        raise ValueError(LABEL_KEY_MESSAGE)
    return key


def _taint_key(key: str) -> str:
    return key if key == "" else _label_key(key)


def _label_value(value: str) -> str:
    if not is_label_value(value):
        raise ValueError(LABEL_VALUE_MESSAGE)
    return value


#: A label value, as a node selector's values and a toleration's value are.
LabelValue = Annotated[
    str,
    Field(
        max_length=63,
        json_schema_extra={
            "x-kubernetes-validations": [cel(f"self.matches(r'{LABEL_VALUE_PATTERN}')", LABEL_VALUE_MESSAGE)]
        },
    ),
    AfterValidator(_label_value),
]
#: A taint key: a label key, or empty (with operator Exists: every taint).
TaintKey = Annotated[
    str,
    Field(
        max_length=317,
        json_schema_extra={
            "x-kubernetes-validations": [cel(f"self == '' || ({_label_key_rule('self')})", LABEL_KEY_MESSAGE)]
        },
    ),
    AfterValidator(_taint_key),
]


def _node_selector_keys(selector: dict[str, str]) -> dict[str, str]:
    for key in selector:
        if not is_label_key(key):
            raise ValueError(f"nodeSelector key {key!r} {LABEL_KEY_MESSAGE}")
    return selector


#: A node selector: label keys to label values. (A structural schema can't constrain map keys; the map's
#: CEL rule does.)
NodeSelector = Annotated[
    dict[str, LabelValue],
    Field(
        max_length=32,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(f"self.all(k, {_label_key_rule('k')})", f"nodeSelector: every key {LABEL_KEY_MESSAGE}")
            ]
        },
    ),
    AfterValidator(_node_selector_keys),
]


class Toleration(SpecModel):
    """A pod toleration, as in the core API, with the core API's rules."""

    key: TaintKey | None = Field(
        None, description="key is the taint key (a label key); empty, with operator Exists, matches all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="operator is Exists or Equal (the default)."
    )
    value: LabelValue | None = Field(
        None, description="value is the taint value (a label value); empty with operator Exists."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="effect is the taint effect; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        description="tolerationSeconds bounds how long a NoExecute taint is tolerated (effect NoExecute "
        "only).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    _EXISTS_WITH_VALUE,
                    ".value",
                ),
                cel(
                    "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                    _EMPTY_KEY,
                    ".operator",
                ),
                cel(
                    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                    _SECONDS_WITHOUT_NO_EXECUTE,
                    ".effect",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _core_rules(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError(_EXISTS_WITH_VALUE)
        if not self.key and self.operator != "Exists":
            raise ValueError(_EMPTY_KEY)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(_SECONDS_WITHOUT_NO_EXECUTE)
        return self
