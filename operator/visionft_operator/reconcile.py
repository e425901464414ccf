"""Level-triggered reconciliation of one VisionFineTune: observe, act, derive the status, write it.

Every trigger (the resource's own events, its Job's and pods' events, the periodic resync) calls
`reconcile`, which is idempotent: children have deterministic names and are created or adopted, so a
restarted operator or a second trigger never makes a second Job. Calls for one resource are serialized by a
per-resource lock, and their blocking part runs one at a time per process (see `_serial`), so two runs
can't both take the last free slot of a namespace.

Why not Kopf's on.create/on.update: those keep their progress in the resource (annotations or status
fields) and replay "changes", while the right action here always follows from the current state of the
resource, its Job and its pods. Level-triggered handlers need no state in the object and no finalizer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from visionft_api import VisionFineTuneSpec
from visionft_api.resource import FINAL_PHASES

from visionft_operator import children, kube, names, policy
from visionft_operator import config as config_mod
from visionft_operator import status as st
from visionft_operator.metrics import REGISTRY

log = logging.getLogger(__name__)

_locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
# The blocking part of every reconcile runs in a worker thread, one at a time per process: admission (the
# namespace's usage, then the Job's creation) is then race-free. A reconcile is a handful of API calls, so
# this serves hundreds of resources; shard by namespace (several Deployments) beyond that.
_serial = threading.Lock()
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


def _job_finished(job: dict[str, Any]) -> bool:
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
            or _job_finished(job)
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


def _ensure_job(
    owner: children.Owner, spec: VisionFineTuneSpec, job: dict[str, Any] | None, phase: str | None
) -> tuple[dict[str, Any] | None, st.PolicyDecision]:
    """Create the children when the run may start; apply suspend/resume and the deadline to a live Job.
    Runs in a worker thread (blocking API calls)."""
    rules = current_policy().for_namespace(owner.namespace)
    image = spec.image or config_mod.get().trainer_image
    decision = policy.check_rules(spec, image, rules)
    if job is None:
        if phase in FINAL_PHASES or decision.verdict == "deny" or spec.suspend:
            return None, decision
        usage = namespace_usage(owner.namespace, names.job_name(owner.name))
        decision = policy.check_capacity(spec, rules, usage)
        if decision.verdict != "allow":
            return None, decision
        return _create_children(owner, spec, rules), decision
    if _job_finished(job):
        return job, st.PolicyDecision()
    patch: dict[str, Any] = {}
    live = job.get("spec") or {}
    if spec.suspend and not live.get("suspend"):
        patch["suspend"] = True
    elif not spec.suspend and live.get("suspend") and not spec.queue_name:
        # Resuming takes capacity again: the policy decides, as for a new run.
        usage = namespace_usage(owner.namespace, job["metadata"]["name"])
        decision = policy.check_capacity(spec, rules, usage)
        if decision.verdict == "allow":
            patch["suspend"] = False
    deadline = spec.run_policy.active_deadline_seconds
    if live.get("activeDeadlineSeconds") != deadline:
        patch["activeDeadlineSeconds"] = deadline
    if patch:
        log.info("patching Job %s/%s: %s", owner.namespace, job["metadata"]["name"], patch)
        job = kube.patch_job(owner.namespace, job["metadata"]["name"], {"spec": patch})
    return job, st.PolicyDecision() if decision.verdict == "deny" else decision


def _ttl_expired(status: dict[str, Any], spec: dict[str, Any]) -> bool:
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or not done or status.get("phase") not in FINAL_PHASES:
        return False
    finished = datetime.strptime(done, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (datetime.now(UTC) - finished).total_seconds() >= ttl


def _observe_and_act(body: dict[str, Any]) -> tuple[st.Derived, dict[str, Any]] | None:
    """The blocking part of a reconcile: reads, child writes, the status patch. Returns the derived
    status and the resource as last written, or None when the resource is gone."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    fresh = kube.read_resource(ns, name)
    if (
        fresh is None
        or fresh["metadata"].get("uid") != meta.get("uid")
        or fresh["metadata"].get("deletionTimestamp")
    ):
        return None
    body = fresh
    meta = body["metadata"]
    raw_spec, status = body.get("spec") or {}, body.get("status") or {}
    if _ttl_expired(status, raw_spec):
        log.info("ttlSecondsAfterFinished expired: deleting %s/%s", ns, name)
        kube.delete_resource(ns, name, meta["uid"])
        return None
    if status.get("phase") in FINAL_PHASES and status.get("observedGeneration") == meta.get("generation"):
        return st.Derived(status=status), body  # finished and already reported: nothing to look at
    owner = children.Owner(namespace=ns, name=name, uid=meta["uid"])
    spec, error = validate(raw_spec)
    job = kube.read_job(ns, names.job_name(name))
    if job is not None and not any(
        o.get("uid") == owner.uid for o in job["metadata"].get("ownerReferences") or []
    ):
        raise kopf.TemporaryError(f"Job {ns}/{job['metadata']['name']} belongs to another owner", delay=5)
    decision = st.PolicyDecision()
    if spec is not None:
        job, decision = _ensure_job(owner, spec, job, status.get("phase"))
    pods = kube.list_pods(ns, name) if job is not None else []
    quota = None
    if job is not None and not pods and not _job_finished(job) and not (job.get("spec") or {}).get("suspend"):
        quota = quota_message(ns, job["metadata"]["name"])
    obs = st.Observation(
        generation=int(meta.get("generation") or 1),
        spec=raw_spec,
        status=status,
        spec_error=error,
        policy=decision,
        job=job,
        pods=pods,
        quota_message=quota,
    )
    derived = st.derive(obs)
    if st.changed(status, derived.status):
        body = kube.patch_status(ns, name, derived.status)
    return derived, body


async def reconcile(body: dict[str, Any], handler: str) -> None:
    """Bring one resource's children and status in line with its spec. Safe to call any time."""
    meta = body.get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    async with _locks[key]:
        with REGISTRY.timed(handler):
            if meta.get("deletionTimestamp"):
                return
            result = await asyncio.to_thread(_serialized, body)
    if result is None:
        REGISTRY.set_phase(*key, None)
        return
    derived, fresh = result
    REGISTRY.set_phase(*key, derived.status.get("phase"))
    if derived.event:
        kind, reason, message = derived.event
        try:
            await asyncio.to_thread(kube.post_event, fresh, kind, reason, message)
        except Exception:  # an Event is for people; a failed post must not fail the reconcile
            log.exception("could not post the %s Event for %s/%s", reason, *key)


def _serialized(body: dict[str, Any]) -> tuple[st.Derived, dict[str, Any]] | None:
    with _serial:
        return _observe_and_act(body)
