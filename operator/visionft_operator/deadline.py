"""spec.runPolicy.activeDeadlineSeconds bounds the whole run, not each of its Jobs.

A Job's own activeDeadlineSeconds counts from that Job's start, and a run can have several Jobs: a
multi-node run makes a new one for each group restart (``gang.py``), and any run makes a new one when its
Job was deleted by hand. So a Job gets only what is left of the run's deadline when it is made: the
deadline minus the seconds since status.startTime, the run's first start (time spent suspended in
between included). The Job carries that elapsed time (annotation ``visionft.io/elapsed-seconds``), so the
deadline, which stays mutable, is applied to the live Job again as ``deadline - elapsed`` without reading
the clock, and the operator never rewrites it just because time passed.

When nothing is left, no further Job is made: a group restart that would start another attempt fails the
run instead (``gang.decide``), and so does a run found without a Job (``decision.py``), both with reason
DeadlineExceeded. Within one Job, the Job controller enforces the deadline itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from visionft_api import VisionFineTuneSpec

from visionft_operator import constants as c


def _parse(timestamp: str) -> datetime:
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def elapsed(status: dict[str, Any], now: datetime) -> int:
    """Whole seconds since status.startTime (the run's first start); 0 before the run started."""
    started = status.get("startTime")
    if not started:
        return 0
    return max(0, int((now - _parse(started)).total_seconds()))


def run_out(spec: VisionFineTuneSpec, seconds: int) -> bool:
    """Whether the run's deadline has no whole second left after ``seconds`` (False without a deadline)."""
    deadline = spec.run_policy.active_deadline_seconds
    return deadline is not None and seconds >= deadline


def job_deadline(spec: VisionFineTuneSpec, seconds: int) -> int | None:
    """A Job's activeDeadlineSeconds for a Job made ``seconds`` after the run's first start: what is left of
    the run's deadline, at least 1 (a deadline cut below what has passed ends the Job at once); None
    without a deadline."""
    deadline = spec.run_policy.active_deadline_seconds
    if deadline is None:
        return None
    return max(1, deadline - seconds)


def job_elapsed(job: dict[str, Any]) -> int:
    """The elapsed seconds a Job was made with (its annotation); 0 for a run's first Job."""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_ELAPSED)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def message(spec: VisionFineTuneSpec, seconds: int) -> str:
    """Why no further attempt starts, ``seconds`` after the run's first start."""
    return (
        f"spec.runPolicy.activeDeadlineSeconds ({spec.run_policy.active_deadline_seconds} s) has run out: "
        f"the run started {seconds} s ago (status.startTime); no further attempt"
    )
