"""Level-triggered reconciliation of one VisionFineTune: observe, decide, act, remember.

Every trigger (the resource's own events, its Job's and pods' events, the periodic resync, a retry) only
puts the resource's key into the work queue (``controller/workqueue.py``); ``Config.workers`` workers call
``Reconciler.reconcile``, and the queue guarantees that one resource is never reconciled twice at once.
A reconcile reads the resource, its Job and its pods from the cache (``controller/cache.py``), asks the
decision function (``decision.py``) what to do, and does it. It is idempotent: children have deterministic
names and are created or adopted, so a restarted operator or a second trigger never makes a second Job.

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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from visionft_operator import children, decision, jobs, names
from visionft_operator import config as config_mod
from visionft_operator import policy as policy_mod
from visionft_operator.controller import kube
from visionft_operator.controller.cache import Cache
from visionft_operator.controller.clock import Clock, SystemClock
from visionft_operator.controller.expectations import Expectations, OwnWrites
from visionft_operator.controller.metrics import REGISTRY
from visionft_operator.controller.workqueue import RetryLater

logger = logging.getLogger(__name__)

Key = tuple[str, str]
#: Children that refer to another child of the same creation, and so can't be tried on their own first.
NOT_DRY_RUN = frozenset({"RoleBinding"})


class Refused(Exception):
    """The apiserver refused to write a child (or its name is another owner's)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


@contextlib.contextmanager
def _refusal(obj: dict[str, Any]) -> Iterator[None]:
    """Turn the apiserver's refusal to write ``obj`` into ``Refused``; outages pass through (retried)."""
    what = f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']}"
    try:
        yield
    except kube.NotOurs as err:
        raise Refused(what, f"{err}: delete it, or rename this VisionFineTune") from err
    except ApiException as err:
        if not kube.refused(err):
            raise
        raise Refused(what, kube.refusal_message(err)) from err


@dataclass
class Outcome:
    """What the blocking part of a reconcile did."""

    #: The plan it carried out.
    plan: decision.Plan
    #: The resource as last read or written, or None when it is gone (deleted, or its TTL ran out).
    body: dict[str, Any] | None
    #: The Job, when this reconcile created it.
    created_job: dict[str, Any] | None = None


class Reconciler:
    """Reconciles VisionFineTunes from one cache; owns what this process remembers between reconciles.

    Args:
        cache (Cache): the process's read cache.
        config (Config): the operator's settings (trainer image, pod settings, policy).
        clock (Clock): wall and monotonic time. Default: the system's.
    """

    def __init__(self, cache: Cache, config: config_mod.Config, clock: Clock | None = None) -> None:
        self.cache = cache
        self.config = config
        self.clock: Clock = clock or SystemClock()
        #: Jobs created by this process that the cache has not shown yet.
        self.expected_jobs = Expectations(self.clock)
        #: Status writes whose watch event has not arrived yet.
        self.own_writes = OwnWrites()
        # Resources waiting for capacity under a policy rule, by namespace: a Job of theirs that ends wakes
        # them.
        self._waiting: dict[str, set[str]] = defaultdict(set)
        self._policy: tuple[str, policy_mod.Policy] | None = None
        # Per-namespace admission locks (taken in worker threads, only under a capacity rule).
        self._admission_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._admission_guard = threading.Lock()

    # --- what the event handlers ask ----------------------------------------------------------------------

    def is_own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether a resource event only echoes this process's last status write (then it needs no
        reconcile: the Job's and pods' own events report any change since)."""
        return self.own_writes.is_echo((namespace, name), resource_version)

    def capacity_waiters(self, namespace: str) -> list[Key]:
        """Resources of the namespace that wait for capacity (to be reconciled when a Job of it ends)."""
        return [(namespace, name) for name in self._waiting.get(namespace, ())]

    # --- the parts of a reconcile -------------------------------------------------------------------------

    def policy(self) -> policy_mod.Policy:
        """The operator's policy, parsed once per setting."""
        key = self.config.policy or f"file:{self.config.policy_file}"
        if self._policy is None or self._policy[0] != key:
            self._policy = (key, policy_mod.Policy.load(self.config.policy, self.config.policy_file))
        return self._policy[1]

    def pod_defaults(self, rules: policy_mod.Rules) -> children.PodDefaults:
        cfg = self.config
        return children.PodDefaults(
            image=cfg.trainer_image,
            node_selector=dict(rules.node_selector or {}),
            tolerations=[t.to_dict() for t in rules.tolerations or []],
            priority_class_name=rules.priority_class_name,
            tmp_size=cfg.tmp_size,
            shm_size=cfg.shm_size,
            pod_annotations=cfg.pod_annotation_map(),
        )

    @contextlib.contextmanager
    def _admission(self, namespace: str) -> Iterator[None]:
        """Hold the namespace's admission lock while a run takes capacity."""
        with self._admission_guard:
            lock = self._admission_locks[namespace]
        with lock:
            yield

    def _create_children(self, namespace: str, objs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Create (or adopt) the children in order; returns the Job. They are first tried as dry runs, so
        that a child the apiserver refuses leaves none of the others behind. A RoleBinding can't be
        tried before its Role exists (the apiserver checks that whoever binds a Role holds what it
        grants): when it is refused, the children this call made are deleted again."""
        for obj in objs:
            if obj["kind"] not in NOT_DRY_RUN:
                with _refusal(obj):
                    kube.dry_run_create(obj)
        job = None
        made_here: list[dict[str, Any]] = []
        try:
            for obj in objs:
                with _refusal(obj):
                    made, created = kube.create_or_adopt(obj)
                if created:
                    logger.info("created %s %s/%s", obj["kind"], namespace, obj["metadata"]["name"])
                    made_here.append({**made, "kind": obj["kind"]})
                if obj["kind"] == "Job":
                    job = made
        except Refused:
            for made in reversed(made_here):
                logger.info("deleting %s %s/%s", made["kind"], namespace, made["metadata"]["name"])
                kube.delete_child(made)
            raise
        return job

    def _write_children(
        self, view: decision.View, plan: decision.Plan
    ) -> tuple[decision.Plan, dict[str, Any] | None]:
        """Create the planned children or patch the live Job; returns the plan (decided again as what the
        run is stuck on when the apiserver refused a write) and the Job created, if any."""
        meta = view.body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            if plan.create:
                return plan, self._create_children(ns, plan.create)
            if plan.job_patch or plan.job_labels:
                job_name = names.job_name(name)
                patch: dict[str, Any] = {"spec": plan.job_patch} if plan.job_patch else {}
                if plan.job_labels:
                    patch["metadata"] = {"labels": plan.job_labels}
                logger.info("patching Job %s/%s: %s", ns, job_name, patch)
                with _refusal({"kind": "Job", "metadata": {"namespace": ns, "name": job_name}}):
                    kube.patch_job(ns, job_name, patch)
        except Refused as err:
            logger.warning("%s/%s: the %s was refused: %s", ns, name, err.what, err.message)
            return decision.decide(decision.with_rejection(view, err.what, err.message)), None
        return plan, None

    def observe(self, body: dict[str, Any]) -> decision.View:
        """What a reconcile of this resource sees: its Job and pods from the cache (a Job this process just
        created counts until the cache shows it), the namespace's policy and the time."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        job_name = names.job_name(name)
        rules = self.policy().for_namespace(ns)
        return decision.View(
            body=body,
            job=self.expected_jobs.resolve((ns, job_name), self.cache.job(ns, job_name)),
            pods=self.cache.pods_of(ns, name),
            rules=rules,
            pod_defaults=self.pod_defaults(rules),
            now=self.clock.now(),
        )

    def _carry_out(self, view: decision.View) -> Outcome:
        """Decide and act: the blocking part of a reconcile (its API calls run in a worker thread)."""
        meta = view.body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        plan = decision.decide(view)
        # Capacity is counted and taken under the namespace's lock, so that two runs can't both take the
        # last free slot.
        admission = self._admission(ns) if decision.NEEDS_USAGE in plan.needs else contextlib.nullcontext()
        with admission:
            if decision.NEEDS_USAGE in plan.needs:
                usage = jobs.usage(kube.list_jobs(ns), exclude=names.job_name(name))
                view = decision.with_usage(view, usage)
                plan = decision.decide(view)
            if decision.NEEDS_JOB_EVENTS in plan.needs and view.job is not None:
                job_meta = view.job["metadata"]
                events = kube.job_events(ns, job_meta["name"], job_meta.get("uid", ""))
                view = decision.with_job_events(view, events)
                plan = decision.decide(view)
            plan, created = self._write_children(view, plan)
        if plan.delete:
            logger.info("ttlSecondsAfterFinished expired: deleting %s/%s", ns, name)
            kube.delete_resource(ns, name, meta["uid"])
            return Outcome(plan=plan, body=None)
        if plan.restart is not None:
            failed = plan.restart.job["metadata"]
            if plan.restart.record:
                kube.patch_status(ns, name, plan.restart.record)
            if not failed.get("deletionTimestamp"):
                logger.info("restarting the group of %s/%s: deleting Job %s", ns, name, failed["name"])
                kube.delete_job_foreground(ns, failed["name"], failed["uid"])
        body = view.body
        if plan.write_status and plan.derived is not None:
            try:
                body = kube.patch_status(
                    ns,
                    name,
                    plan.derived.status,
                    remove_progress=plan.derived.remove_progress,
                    resource_version=meta.get("resourceVersion"),
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                return Outcome(plan=plan, body=None)  # deleted, and the cache missed it
        return Outcome(plan=plan, body=body, created_job=created)

    # --- the event-loop side ------------------------------------------------------------------------------

    def _forget(self, key: Key) -> None:
        self.own_writes.forget(key)
        self._waiting.get(key[0], set()).discard(key[1])
        REGISTRY.set_phase(*key, None)

    async def reconcile(self, key: Key) -> float | None:
        """Bring one resource's children and status in line with its spec. Safe to call any time; the work
        queue calls it for one key at a time. Returns seconds after which to look again (a TTL), or None."""
        namespace, name = key
        body = self.cache.resource(namespace, name)
        if body is not None and self.own_writes.cache_is_behind(key, body["metadata"].get("resourceVersion")):
            # The cache does not show this process's last status write yet: read the resource itself, so
            # that the write is neither repeated nor its Event posted twice.
            body = await asyncio.to_thread(kube.read_resource, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self._forget(key)
            return None
        outcome = await asyncio.to_thread(self._carry_out, self.observe(body))
        if outcome.created_job is not None:
            self.expected_jobs.expect((namespace, names.job_name(name)), outcome.created_job)
        plan = outcome.plan
        if outcome.body is None:
            self.cache.resources.discard(key)
            self._forget(key)
            return None
        if plan.write_status:
            self.own_writes.wrote(key, outcome.body["metadata"].get("resourceVersion", ""))
        if plan.waiting:
            self._waiting[namespace].add(name)
        else:
            self._waiting.get(namespace, set()).discard(name)
        shown = plan.derived.status if plan.derived is not None else outcome.body.get("status") or {}
        REGISTRY.set_phase(namespace, name, shown.get("phase"))
        events = (
            (plan.derived.event, plan.derived.evaluation_event) if plan.derived and plan.write_status else ()
        )
        for event in events:
            if event is None:
                continue
            kind, reason, message = event
            try:
                await asyncio.to_thread(kube.post_event, outcome.body, kind, reason, message)
            except Exception:  # an Event is for people; a failed post must not fail the reconcile
                logger.exception("could not post the %s Event for %s/%s", reason, *key)
        if plan.backoff:
            # The status and an Event say why; retrying the same write soon would get the same answer.
            raise RetryLater(shown.get("message") or "stuck")
        return plan.again
