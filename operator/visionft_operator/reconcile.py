"""Level-triggered reconciliation of one VisionFineTune: observe, act, derive the status, write it.

Every trigger (the resource's own events, its Job's and pods' events, the periodic resync, a retry) only
puts the resource's key into the work queue (`workqueue.py`); `Config.workers` workers call
`reconcile_key`, and the queue guarantees that one resource is never reconciled twice at once. The
reconcile reads the resource, its Job and its pods from the cache (`cache.py`) and is idempotent: children
have deterministic names and are created or adopted, so a restarted operator or a second trigger never
makes a second Job.

Admission (the namespace's usage, then the Job's creation or resumption) is the one step that must not
interleave between resources: under a capacity rule (maxConcurrentJobs, maxGpusPerNamespace) it holds the
namespace's lock and counts the namespace's Jobs with a fresh list, so two runs can't both take the last
free slot. Everything else runs in parallel.

Why not Kopf's on.create/on.update: those keep their progress in the resource (annotations or status
fields) and replay "changes", while the right action here always follows from the current state of the
resource, its Job and its pods. Level-triggered handlers need no state in the object and no finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from visionft_api import VisionFineTuneSpec
from visionft_api import conditions as cond
from visionft_api.resource import FINAL_PHASES

from visionft_operator import cache, children, deadline, gang, kube, names, policy
from visionft_operator import config as config_mod
from visionft_operator import status as st
from visionft_operator.metrics import REGISTRY

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Per-namespace admission locks (taken in worker threads, only under a capacity rule).
_admission_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
_admission_guard = threading.Lock()
#: How long a Job this process created counts although the cache has not shown it yet.
EXPECTATION_SECONDS = 60.0
# The state below is only touched on the event loop (reconcile_key and the event handlers).
# Jobs created by this process that the cache has not shown yet: (namespace, Job name) -> (deadline, Job).
_expected: dict[Key, tuple[float, dict[str, Any]]] = {}
# Status writes whose watch event has not arrived yet: key -> the resourceVersion the write returned.
_written: dict[Key, str] = {}
# Resources waiting for capacity under a policy rule, by namespace: a Job of theirs that ends wakes them.
_waiting: dict[str, set[str]] = defaultdict(set)
_policy_cache: tuple[str, policy.Policy] | None = None


def current_policy() -> policy.Policy:
    global _policy_cache
    cfg = config_mod.get()
    key = cfg.policy or f"file:{cfg.policy_file}"
    if _policy_cache is None or _policy_cache[0] != key:
        _policy_cache = (key, policy.Policy.load(cfg.policy, cfg.policy_file))
    return _policy_cache[1]


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the field as `spec.a.b`."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(p) for p in ("spec", *problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def validate(spec: dict[str, Any]) -> tuple[VisionFineTuneSpec | None, str | None]:
    try:
        return VisionFineTuneSpec.model_validate(spec), None
    except ValidationError as err:
        return None, format_validation_error(err)


def job_finished(job: dict[str, Any]) -> bool:
    for c in (job.get("status") or {}).get("conditions") or []:
        if (
            c.get("type") in {"Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"}
            and c.get("status") == "True"
        ):
            return True
    return False


def _job_gpus(job: dict[str, Any]) -> int:
    spec = job.get("spec") or {}
    per_pod = 0
    for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
        per_pod += int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu") or 0)
    return per_pod * int(spec.get("parallelism") or 1)


def namespace_usage(namespace: str, exclude_job: str) -> policy.Usage:
    """Running (not finished, not suspended) Jobs of the operator in a namespace, and their GPUs."""
    jobs = gpus = 0
    for job in kube.list_jobs(namespace):
        if (
            job["metadata"]["name"] == exclude_job
            or job_finished(job)
            or (job.get("spec") or {}).get("suspend")
        ):
            continue
        jobs += 1
        gpus += _job_gpus(job)
    return policy.Usage(jobs=jobs, gpus=gpus)


def quota_message(namespace: str, job_name: str) -> str | None:
    """The newest FailedCreate event of the Job that blames a ResourceQuota."""
    found = None
    for event in kube.job_events(namespace, job_name):
        message = event.get("message") or ""
        if event.get("reason") == "FailedCreate" and "exceeded quota" in message:
            found = message
    return found


def _defaults(rules: policy.Rules) -> children.PodDefaults:
    cfg = config_mod.get()
    return children.PodDefaults(
        image=cfg.trainer_image,
        node_selector=dict(rules.node_selector or {}),
        tolerations=list(rules.tolerations or []),
        priority_class_name=rules.priority_class_name,
        tmp_size=cfg.tmp_size,
        shm_size=cfg.shm_size,
        pod_annotations=cfg.pod_annotation_map(),
    )


def _create_children(owner: children.Owner, spec: VisionFineTuneSpec, rules: policy.Rules) -> dict[str, Any]:
    job: dict[str, Any] = {}
    for obj in children.all_children(owner, spec, _defaults(rules)):
        made, created = kube.create_or_adopt(obj)
        if created:
            log.info("created %s %s/%s", obj["kind"], owner.namespace, obj["metadata"]["name"])
        if obj["kind"] == "Job":
            job = made
    return job


def _has_capacity_rule(rules: policy.Rules) -> bool:
    return rules.max_concurrent_jobs is not None or rules.max_gpus_per_namespace is not None


@contextlib.contextmanager
def _admission(namespace: str, rules: policy.Rules) -> Iterator[None]:
    """Hold the namespace's admission lock while a run takes capacity, when a capacity rule applies."""
    if not _has_capacity_rule(rules):
        yield
        return
    with _admission_guard:
        lock = _admission_locks[namespace]
    with lock:
        yield


def _capacity(
    spec: VisionFineTuneSpec, rules: policy.Rules, namespace: str, job_name: str
) -> st.PolicyDecision:
    """The capacity verdict; lists the namespace's Jobs only when a capacity rule applies."""
    if not _has_capacity_rule(rules):
        return st.PolicyDecision()
    return policy.check_capacity(spec, rules, namespace_usage(namespace, job_name))


def _ensure_job(
    owner: children.Owner, spec: VisionFineTuneSpec, job: dict[str, Any] | None, phase: str | None
) -> tuple[dict[str, Any] | None, st.PolicyDecision, bool]:
    """Create the children when the run may start; apply suspend/resume and the deadline to a live Job.
    Returns the Job, the policy decision and whether the Job was created now. Runs in a worker thread
    (blocking API calls)."""
    rules = current_policy().for_namespace(owner.namespace)
    image = spec.image or config_mod.get().trainer_image
    decision = policy.check_rules(spec, image, rules)
    if job is None:
        if phase in FINAL_PHASES or decision.verdict == "deny" or spec.suspend:
            return None, decision, False
        with _admission(owner.namespace, rules):
            decision = _capacity(spec, rules, owner.namespace, names.job_name(owner.name))
            if decision.verdict != "allow":
                return None, decision, False
            return _create_children(owner, spec, rules), decision, True
    if job_finished(job):
        return job, st.PolicyDecision(), False
    patch: dict[str, Any] = {}
    live = job.get("spec") or {}
    # What is left of the run's deadline for this Job (deadline.py): an edited deadline applies at once.
    job_deadline = deadline.job_deadline(spec, deadline.job_elapsed(job))
    if live.get("activeDeadlineSeconds") != job_deadline:
        patch["activeDeadlineSeconds"] = job_deadline
    # Resuming takes capacity again: the policy decides, as for a new run.
    resuming = not spec.suspend and bool(live.get("suspend")) and not spec.queue_name
    if spec.suspend and not live.get("suspend"):
        patch["suspend"] = True
    with _admission(owner.namespace, rules) if resuming else contextlib.nullcontext():
        if resuming:
            decision = _capacity(spec, rules, owner.namespace, job["metadata"]["name"])
            if decision.verdict == "allow":
                patch["suspend"] = False
        if patch:
            log.info("patching Job %s/%s: %s", owner.namespace, job["metadata"]["name"], patch)
            job = kube.patch_job(owner.namespace, job["metadata"]["name"], {"spec": patch})
    return job, st.PolicyDecision() if decision.verdict == "deny" else decision, False


#: How long a failed Job's status waits for the cache to show its failed pod (pods can also go away).
POD_LAG_SECONDS = 10.0


def pods_lag(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> float | None:
    """Seconds to wait before reporting a failed Job whose failed pod the cache does not show yet (the
    Job's and the pods' watches are not ordered with each other); None when there is nothing to wait for:
    no failure, a failed pod of the Job in the cache, or more than POD_LAG_SECONDS since the failure."""
    if job is None:
        return None
    failure = next(
        (
            x
            for x in (job.get("status") or {}).get("conditions") or []
            if x.get("type") in {"Failed", "FailureTarget"} and x.get("status") == "True"
        ),
        None,
    )
    if failure is None:
        return None
    uid = job["metadata"].get("uid")
    for pod in pods:
        mine = any(o.get("uid") == uid for o in pod["metadata"].get("ownerReferences") or [])
        if mine and (pod.get("status") or {}).get("phase") == "Failed":
            return None
    since = failure.get("lastTransitionTime")
    if not since:
        return None
    failed_at = datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    if (datetime.now(UTC) - failed_at).total_seconds() > POD_LAG_SECONDS:
        return None
    return 1.0


def _ttl_left(status: dict[str, Any], spec: dict[str, Any]) -> float | None:
    """Seconds until ttlSecondsAfterFinished deletes a finished resource (<= 0: now); None without one."""
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or not done or status.get("phase") not in FINAL_PHASES:
        return None
    finished = datetime.strptime(done, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return ttl - (datetime.now(UTC) - finished).total_seconds()


def settled(body: dict[str, Any]) -> bool:
    """Whether a reconcile would find nothing to do: finished, reported for the current generation, and
    no TTL to enforce (a TTL's expiry is queued by the reconcile that saw the run finish)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return (
        status.get("phase") in FINAL_PHASES
        and status.get("observedGeneration") == meta.get("generation")
        and ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished") is None
    )


@dataclass
class Outcome:
    """What the blocking part of a reconcile did and found."""

    #: The derived status, or None when the resource is gone (its TTL ran out).
    derived: st.Derived | None
    #: The resource as last read or written.
    body: dict[str, Any] | None = None
    #: The Job, when this reconcile created it.
    created_job: dict[str, Any] | None = None
    #: Whether the run waits for capacity under a policy rule.
    waiting: bool = False
    #: Whether the status was patched (its watch event will echo this write).
    wrote_status: bool = False
    #: Seconds until the resource needs another look (its TTL), or None.
    again: float | None = None


def _observe_and_act(body: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Outcome:
    """The blocking part of a reconcile, from the cached resource, Job and pods: child writes, the status
    patch, the TTL's deletion."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    raw_spec, status = body.get("spec") or {}, body.get("status") or {}
    ttl_left = _ttl_left(status, raw_spec)
    if ttl_left is not None and ttl_left <= 0:
        log.info("ttlSecondsAfterFinished expired: deleting %s/%s", ns, name)
        kube.delete_resource(ns, name, meta["uid"])
        return Outcome(derived=None)
    if status.get("phase") in FINAL_PHASES and status.get("observedGeneration") == meta.get("generation"):
        # Finished and already reported: nothing to look at until the TTL runs out.
        return Outcome(derived=st.Derived(status=status), body=body, again=ttl_left)
    elapsed = deadline.elapsed(status, datetime.now(UTC))
    owner = children.Owner(
        namespace=ns,
        name=name,
        uid=meta["uid"],
        restarts=int(status.get("restarts") or 0),
        attempts=int(status.get("attempts") or 0),
        elapsed=elapsed,
    )
    spec, error = validate(raw_spec)
    if job is not None and not any(
        o.get("uid") == owner.uid for o in job["metadata"].get("ownerReferences") or []
    ):
        raise kopf.TemporaryError(f"Job {ns}/{job['metadata']['name']} belongs to another owner", delay=5)
    decision = st.PolicyDecision()
    created = False
    # A run that started and has no Job (its group restarts, or its Job was deleted by hand) gets another
    # only while its deadline has time left (deadline.py); a suspended one finds out when it resumes.
    out_of_time = (
        spec is not None
        and job is None
        and not spec.suspend
        and bool(status.get("startTime"))
        and status.get("phase") not in FINAL_PHASES
        and deadline.run_out(spec, elapsed)
    )
    if spec is not None and not out_of_time:
        job, decision, created = _ensure_job(owner, spec, job, status.get("phase"))
    if created:
        pods = []
    quota = None
    if (
        job is not None
        and not created  # a Job made a moment ago has no FailedCreate Events yet
        and not pods
        and not job_finished(job)
        and not (job.get("spec") or {}).get("suspend")
    ):
        quota = quota_message(ns, job["metadata"]["name"])
    wait = pods_lag(job, pods)
    if wait is not None:
        # The Job failed, and its failed pod (whose exit code and message the status reports, and which a
        # gang restart counts) is not in the cache yet: the two come on separate watches. Write nothing;
        # the pod's event queues this resource again, and so does the retry.
        return Outcome(derived=st.Derived(status=status), body=body, again=wait)
    # A multi-node run whose pod failed restarts as a group (gang.py): its Job goes, a later reconcile
    # makes the next attempt's.
    group = gang.decide(spec, job, pods, owner.restarts, elapsed) if spec is not None else None
    if group is not None and group.restart and job is not None:
        gang.restart(ns, name, job, pods, group, status)
        job = None
    state = group.state if group is not None else None
    if out_of_time and spec is not None:
        state = (
            "Failed",
            cond.REASON_DEADLINE_EXCEEDED,
            f"DeadlineExceeded: {deadline.message(spec, elapsed)}",
        )
    obs = st.Observation(
        generation=int(meta.get("generation") or 1),
        spec=raw_spec,
        status=status,
        spec_error=error,
        policy=decision,
        job=job,
        pods=pods,
        quota_message=quota,
        group=state,
        restarts=group.restarts if group is not None else None,
    )
    derived = st.derive(obs)
    wrote = st.changed(status, derived.status)
    if wrote:
        try:
            body = kube.patch_status(ns, name, derived.status)
        except ApiException as err:
            if err.status != 404:
                raise
            return Outcome(derived=None)  # deleted, and the cache missed it
    return Outcome(
        derived=derived,
        body=body,
        created_job=job if created else None,
        waiting=decision.verdict == "wait",
        wrote_status=wrote,
        again=_ttl_left(derived.status, raw_spec),
    )


# --- the event-loop side ----------------------------------------------------------------------------------


def _cached_job(namespace: str, job_name: str) -> dict[str, Any] | None:
    """The Job from the cache, else one this process created that the cache does not show yet."""
    key = (namespace, job_name)
    job = cache.job(namespace, job_name)
    if job is not None:
        _expected.pop(key, None)
        return job
    expected = _expected.get(key)
    if expected is not None and expected[0] < time.monotonic():
        _expected.pop(key, None)  # deleted before the cache ever saw it
        return None
    return expected[1] if expected is not None else None


def is_own_write(namespace: str, name: str, resource_version: str | None) -> bool:
    """Whether a resource event only echoes this process's last status write (then it needs no reconcile:
    the Job's and pods' own events report any change since). Called by the resource event handler."""
    key = (namespace, name)
    if resource_version is not None and _written.get(key) == resource_version:
        del _written[key]
        return True
    return False


def capacity_waiters(namespace: str) -> list[Key]:
    """Resources of the namespace that wait for capacity (to be reconciled when a Job of it ends)."""
    return [(namespace, name) for name in _waiting.get(namespace, ())]


def _forget(key: Key) -> None:
    _written.pop(key, None)
    _waiting.get(key[0], set()).discard(key[1])
    REGISTRY.set_phase(*key, None)


async def reconcile_key(key: Key) -> float | None:
    """Bring one resource's children and status in line with its spec. Safe to call any time; the work
    queue calls it for one key at a time. Returns seconds after which to look again (a TTL), or None."""
    namespace, name = key
    body = cache.resource(namespace, name)
    if body is not None and key in _written and body["metadata"].get("resourceVersion") != _written[key]:
        # The cache does not show this process's last status write yet: read the resource itself, so
        # that the write is neither repeated nor its Event posted twice.
        del _written[key]
        body = await asyncio.to_thread(kube.read_resource, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        _forget(key)
        return None
    job_name = names.job_name(name)
    outcome = await asyncio.to_thread(
        _observe_and_act, body, _cached_job(namespace, job_name), cache.pods(namespace, name)
    )
    if outcome.created_job is not None:
        _expected[(namespace, job_name)] = (time.monotonic() + EXPECTATION_SECONDS, outcome.created_job)
    if outcome.derived is None or outcome.body is None:
        cache.RESOURCES.discard(key)
        _forget(key)
        return None
    if outcome.wrote_status:
        _written[key] = outcome.body["metadata"].get("resourceVersion", "")
    if outcome.waiting:
        _waiting[namespace].add(name)
    else:
        _waiting.get(namespace, set()).discard(name)
    REGISTRY.set_phase(namespace, name, outcome.derived.status.get("phase"))
    for event in (outcome.derived.event, outcome.derived.evaluation_event):
        if event is None:
            continue
        kind, reason, message = event
        try:
            await asyncio.to_thread(kube.post_event, outcome.body, kind, reason, message)
        except Exception:  # an Event is for people; a failed post must not fail the reconcile
            log.exception("could not post the %s Event for %s/%s", reason, *key)
    return outcome.again
