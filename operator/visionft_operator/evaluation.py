"""What the operator makes of ``status.evaluation`` (written by the trainer pod): the Degraded condition, the
failure that ``spec.evaluation.failIfWorseThanBase`` asks for, and the Event for a new best evaluation.

Pure functions of the spec and the status, used by ``status.derive``. The comparison itself is the schema's
(``visionft_api.evaluation.worse_than``), the one the trainer uses for its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionft_api import conditions as cond
from visionft_api.evaluation import EVAL_LOSS, METRICS, worse_than


@dataclass(frozen=True)
class Verdict:
    """How the output compares with the base model on the headline metric.

    Attributes:
        worse (bool): the output's value is strictly worse.
        message (str): for the Degraded condition and, when it fails the run, the status message.
    """

    worse: bool
    message: str


def _known(metric: Any) -> bool:
    return isinstance(metric, str) and (metric in METRICS or metric == EVAL_LOSS)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def verdict(status: dict[str, Any]) -> Verdict | None:
    """The output against the base model, once the trainer reported both (``status.evaluation.final`` and
    ``.base``); None before."""
    evaluation = (status or {}).get("evaluation") or {}
    metric = evaluation.get("metric")
    final = (evaluation.get("final") or {}).get("value")
    base = (evaluation.get("base") or {}).get("value")
    if not _known(metric) or not isinstance(final, int | float) or not isinstance(base, int | float):
        return None
    if worse_than(float(final), float(base), metric):
        return Verdict(
            True,
            f"the output's {metric} {_fmt(final)} is worse than the base model's {_fmt(base)} "
            "(status.evaluation)",
        )
    return Verdict(False, f"the output's {metric} {_fmt(final)} against the base model's {_fmt(base)}")


def fails_run(spec: dict[str, Any], status: dict[str, Any]) -> Verdict | None:
    """The verdict when it fails the run: worse than the base and ``spec.evaluation.failIfWorseThanBase``."""
    found = verdict(status)
    asked = bool(((spec or {}).get("evaluation") or {}).get("failIfWorseThanBase"))
    return found if found is not None and found.worse and asked else None


def degraded_condition(status: dict[str, Any]) -> tuple[str, str, str] | None:
    """(status, reason, message) of the Degraded condition, or None before the output was evaluated."""
    found = verdict(status)
    if found is None:
        return None
    if found.worse:
        return "True", cond.REASON_WORSE_THAN_BASE, found.message
    return "False", cond.REASON_NOT_WORSE_THAN_BASE, found.message


def new_best(status: dict[str, Any]) -> tuple[int, str] | None:
    """(step, Event message) when ``status.evaluation.best`` is at a step the operator has not announced
    (``status.announcedBestStep``); None otherwise."""
    evaluation = (status or {}).get("evaluation") or {}
    best = evaluation.get("best") or {}
    step, value = best.get("step"), best.get("value")
    if not isinstance(step, int) or step <= 0 or not isinstance(value, int | float):
        return None
    if step == (status or {}).get("announcedBestStep"):
        return None
    metric = best.get("metric") or evaluation.get("metric") or "metric"
    message = f"new best {metric} {_fmt(value)} at step {step}"
    base = ((evaluation.get("base") or {}).get("values") or {}).get(metric)
    if isinstance(base, int | float):
        message += f" (base model {_fmt(base)})"
    return step, message
