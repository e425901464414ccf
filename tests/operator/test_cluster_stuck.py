"""Runs that pass validation and then cannot start, on the real control plane with the real operator: each
ends in a state where ``kubectl get vft`` and ``kubectl describe vft`` name the cause and the field to change,
a Warning Event says it, kstatus is not Current, and no orphaned children remain. Also: progress and ETA
belong to an attempt, and a name of any length the CRD accepts runs.

kwok plays the kubelets: what a kubelet reports about a container that can't start (an image pull, a
container config) is written to the pod's status as the kubelet writes it. The scheduler, the Job
controller, the admission plugins and ValidatingAdmissionPolicies are the real ones."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import pytest
import yaml
from visionft_api import conditions as cond
from visionft_operator import names

from tests.harness.kstatus import kstatus_of
from tests.operator.kube import REPO, Kube, OperatorProcess, wait_for
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster

# The kinds and names of a run's children.
CHILDREN = (
    ("serviceaccount", names.service_account_name),
    ("role", names.role_name),
    ("rolebinding", names.role_name),
    ("configmap", names.config_map_name),
    ("job", names.job_name),
)


def _conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def _wait_reason(kube: Kube, name: str, namespace: str, reason: str, timeout: float = 45) -> dict:
    """The resource once its Ready condition gives ``reason`` (the Reason column)."""

    def check() -> dict | None:
        obj = kube.vft(name, namespace) or {}
        ready = _conditions(obj).get(cond.READY) if (obj.get("status") or {}).get("conditions") else None
        return obj if ready and ready["reason"] == reason else None

    try:
        return wait_for(check, timeout=timeout, what=f"{namespace}/{name} with reason {reason}")
    except TimeoutError as err:
        raise AssertionError(f"{err}; status: {(kube.vft(name, namespace) or {}).get('status')}") from None


def _warning(kube: Kube, name: str, namespace: str, reason: str) -> dict:
    return wait_for(
        lambda: next(
            (e for e in kube.events(namespace, name) if e["type"] == "Warning" and e["reason"] == reason),
            None,
        ),
        timeout=20,
        what=f"a Warning Event {reason} for {namespace}/{name}",
    )


def _assert_reported(
    kube: Kube, name: str, namespace: str, reason: str, says: tuple[str, ...], kstatus: str
) -> dict:
    """The run shows ``reason`` and what ``says`` in get, describe, its Event and kstatus."""
    obj = _wait_reason(kube, name, namespace, reason)
    message = obj["status"]["message"]
    for text in says:
        assert text in message, message
    table = kube.run("get", "vft", name, "-n", namespace).stdout
    assert reason in table.splitlines()[1], table  # the Reason column
    described = kube.run("describe", "vft", name, "-n", namespace).stdout
    assert reason in described and says[-1] in described, described
    event = _warning(kube, name, namespace, reason)
    assert says[-1] in event["message"], event
    assert kstatus_of(obj) == kstatus, obj["status"]
    return obj


def _children(kube: Kube, name: str, namespace: str) -> list[str]:
    return [f"{kind}/{of(name)}" for kind, of in CHILDREN if kube.get(kind, of(name), namespace) is not None]


# --- a child the apiserver refuses ------------------------------------------------------------------------

CPU_POLICY = "vft-stuck-jobs-at-most-2-cpus"
BINDING_POLICY = "vft-stuck-no-rolebindings"


@contextlib.contextmanager
def _denying(
    kube: Kube, namespace: str, name: str, rule: tuple[str, str], expression: str, message: str, probe: dict
) -> Iterator[str]:
    """A ValidatingAdmissionPolicy of the cluster that refuses creating ``rule`` (api group, resource) in
    the namespace unless ``expression`` holds: a rule the CRD can't know, as a cluster admin writes them.
    ``probe``, an object it refuses, tells when it is in effect."""
    group, resource_ = rule
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [group],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [resource_],
                    }
                ]
            },
            "validations": [{"expression": expression, "message": message}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    kube.apply([policy, binding])
    try:
        # A policy takes effect a moment after it is made.
        wait_for(
            lambda: kube.apply(probe, "--dry-run=server", check=False).returncode != 0,
            timeout=30,
            what="the ValidatingAdmissionPolicy in effect",
        )
        yield name
    finally:
        kube.run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False)


@pytest.fixture
def cpu_policy(kube: Kube, namespace: str) -> Iterator[str]:
    """Refuses Jobs asking for more than 2 CPUs in this namespace."""
    probe = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": "3"}}}],
                }
            }
        },
    }
    with _denying(
        kube,
        namespace,
        CPU_POLICY,
        ("batch", "jobs"),
        "object.spec.template.spec.containers.all(c, !has(c.resources.requests) "
        "|| !('cpu' in c.resources.requests) "
        "|| quantity(c.resources.requests.cpu).compareTo(quantity('2')) <= 0)",
        "Jobs in this namespace may request at most 2 CPUs (resources.requests.cpu)",
        probe,
    ) as name:
        yield name


@pytest.fixture
def binding_policy(kube: Kube, namespace: str) -> Iterator[str]:
    """Refuses every RoleBinding in this namespace: the one child that is not tried as a dry run first."""
    probe = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "probe", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
    }
    with _denying(
        kube,
        namespace,
        BINDING_POLICY,
        ("rbac.authorization.k8s.io", "rolebindings"),
        "false",
        "RoleBindings are made by the platform team in this namespace",
        probe,
    ) as name:
        yield name


def test_a_refused_child_is_reported_backs_off_leaves_nothing_behind_and_recovers(
    kube: Kube, namespace: str, operator: OperatorProcess, cpu_policy: str
) -> None:
    name = "refused"
    kube.apply(resource(name, namespace, spec(**{"resources.cpu": "4"})))
    obj = _assert_reported(
        kube,
        name,
        namespace,
        cond.REASON_CHILD_REJECTED,
        (f"Job {namespace}/{name}-trainer", "at most 2 CPUs", "spec.resources.cpu"),
        kstatus="Failed",
    )
    conditions = _conditions(obj)
    assert obj["status"]["phase"] == "Pending"
    assert conditions[cond.STALLED]["status"] == "True"
    assert conditions[cond.RECONCILING]["status"] == "False"
    # Each child was tried as a dry run first: none of them is left behind.
    assert _children(kube, name, namespace) == []
    # The retries back off (0.5 s, 1 s, 2 s, ...) instead of hammering the apiserver every second.
    pattern = re.compile(rf"{namespace}/{name} is stuck .*?looking again in ([0-9.]+) s")

    def retries() -> list[float] | None:
        found = [float(d) for d in pattern.findall(operator.logs())]
        return found if len(found) >= 4 else None

    delays = wait_for(retries, timeout=30, what="four backed-off retries in the operator's log")
    assert delays[:4] == sorted(delays[:4]) and delays[3] >= 4 * delays[0], delays
    assert _children(kube, name, namespace) == []
    # A fixed spec is picked up at once, backoff or not.
    kube.patch("vft", name, namespace, {"spec": {"resources": {"cpu": "2"}}})
    obj = kube.wait_phase(name, namespace, "Initializing", "Training", timeout=30)
    assert _conditions(obj)[cond.STALLED]["status"] == "False"
    assert len(_children(kube, name, namespace)) == len(CHILDREN)
    assert kstatus_of(obj) == "InProgress"


def test_a_refused_role_binding_leaves_nothing_behind(
    kube: Kube, namespace: str, operator: OperatorProcess, binding_policy: str
) -> None:
    name = "unbound"
    kube.apply(resource(name, namespace))
    obj = _assert_reported(
        kube,
        name,
        namespace,
        cond.REASON_CHILD_REJECTED,
        (f"RoleBinding {namespace}/{names.role_name(name)}", "made by the platform team"),
        kstatus="Failed",
    )
    assert obj["status"]["phase"] == "Pending"
    # The ServiceAccount and the Role made before the refusal are deleted again, at every retry (a retry
    # makes them for a moment).
    wait_for(lambda: _children(kube, name, namespace) == [], timeout=20, what="no children left")
    time.sleep(3)  # several backed-off retries
    wait_for(lambda: _children(kube, name, namespace) == [], timeout=20, what="no children left")
    # Once the cluster allows it, the run starts.
    kube.run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", binding_policy)
    kube.wait_phase(name, namespace, "Initializing", "Training", timeout=90)
    assert len(_children(kube, name, namespace)) == len(CHILDREN)


def test_the_reported_toleration_is_refused_at_apply(kube: Kube, namespace: str) -> None:
    # The reproducer of a refused Job: examples/latex-ocr.yaml with a toleration the core API refuses.
    example = yaml.safe_load((REPO / "examples" / "latex-ocr.yaml").read_text())
    example["metadata"]["namespace"] = namespace
    example["spec"]["resources"]["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": "present", "effect": "NoSchedule"}
    ]
    result = kube.apply(example, check=False)
    assert result.returncode != 0, result.stdout
    assert "spec.resources.tolerations[0].value" in result.stderr, result.stderr
    assert "value must be empty when operator is Exists" in result.stderr, result.stderr


# --- a name of any length -------------------------------------------------------------------------------


def test_a_253_character_name_runs_to_the_end(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "latex-ocr-" + "x" * 242 + "z"
    assert len(name) == 253
    kube.apply(resource(name, namespace))
    pod = kube.wait_pod(name, namespace, timeout=60)
    assert pod["metadata"]["labels"]["visionft.io/name"] == names.label_value(name)
    kube.wait_phase(name, namespace, "Initializing")
    kube.report_progress(
        name, namespace, {"step": 3, "totalSteps": 10, "stage": "Training"}, names.service_account_name(name)
    )
    kube.wait_phase(name, namespace, "Training")
    kube.terminate_pod(pod, exit_code=0)
    obj = kube.wait_phase(name, namespace, "Succeeded")
    assert obj["status"]["jobName"] == names.job_name(name)
    assert kstatus_of(obj) == "Current"


# --- pods that can't start ------------------------------------------------------------------------------


POOL = {"visionft.io/test-pool": "stuck"}


@pytest.fixture(scope="module")
def eight_gpu_pool(control_plane: object) -> dict[str, str]:
    """A fake node of this module's own with 8 GPUs (the shared cluster may hold bigger ones)."""
    control_plane.add_gpu_node("stuck-0", gpus=8, labels=POOL)  # type: ignore[attr-defined]
    return POOL


def test_an_unschedulable_pod_says_so_and_waits(
    kube: Kube, namespace: str, operator: OperatorProcess, eight_gpu_pool: dict[str, str]
) -> None:
    name = "too-big"
    body = spec(**{"resources.gpusPerNode": 16, "resources.nodeSelector": eight_gpu_pool})
    kube.apply(resource(name, namespace, body))
    obj = _assert_reported(
        kube,
        name,
        namespace,
        cond.REASON_UNSCHEDULABLE,
        ("Insufficient nvidia.com/gpu", "spec.resources.gpusPerNode"),
        kstatus="InProgress",
    )
    assert obj["status"]["phase"] == "Pending"
    assert _conditions(obj)[cond.STALLED]["status"] == "False"  # a node may free up


def test_a_job_that_cannot_create_its_pod_says_why(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "no-priority"
    kube.apply(resource(name, namespace, spec(**{"resources.priorityClassName": "does-not-exist"})))
    obj = _assert_reported(
        kube,
        name,
        namespace,
        cond.REASON_FAILED_CREATE,
        ("does-not-exist", "spec.resources.priorityClassName"),
        kstatus="Failed",
    )
    assert obj["status"]["phase"] == "Pending"
    assert _conditions(obj)[cond.STALLED]["status"] == "True"


@pytest.mark.parametrize(
    ("reason", "message", "field"),
    [
        ("ImagePullBackOff", 'Back-off pulling image "ghcr.io/visionft/trainer:test"', "spec.image"),
        ("ErrImagePull", "rpc error: code = NotFound desc = manifest unknown", "spec.image"),
        (
            "CreateContainerConfigError",
            'configmap "ca-bundle" not found',
            "spec.storage.caBundleConfigMap",
        ),
    ],
    ids=["image-pull-backoff", "err-image-pull", "container-config"],
)
def test_a_container_that_cannot_start_says_why(
    kube: Kube, namespace: str, operator: OperatorProcess, reason: str, message: str, field: str
) -> None:
    name = f"kubelet-{reason.lower()}"
    kube.apply(resource(name, namespace))
    pod = kube.wait_pod(name, namespace, phase="Running")
    kube.container_waiting(pod, reason, message)
    obj = _assert_reported(kube, name, namespace, reason, (message, field), kstatus="Failed")
    assert obj["status"]["phase"] == "Pending"


# --- progress belongs to an attempt ---------------------------------------------------------------------


def _report(kube: Kube, name: str, namespace: str, step: int) -> None:
    eta = (10 - step) * 3
    progress = {
        "step": step,
        "totalSteps": 10,
        "summary": f"{step}/10",
        "stage": "Training",
        "eta": f"{eta}s",
        "etaSeconds": eta,
    }
    kube.report_progress(name, namespace, progress, names.service_account_name(name))


def _initializing_without_progress(kube: Kube, name: str, namespace: str) -> None:
    """The new attempt shows no earlier progress, for several resyncs in a row."""
    kube.wait_phase(name, namespace, "Initializing")
    for _ in range(4):
        obj = kube.vft(name, namespace) or {}
        assert obj["status"]["phase"] == "Initializing", obj["status"]
        assert "progress" not in obj["status"], obj["status"]
        time.sleep(1)  # the operator resyncs every second here


def test_progress_and_eta_belong_to_an_attempt(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "attempts"
    kube.apply(resource(name, namespace))
    first = kube.wait_pod(name, namespace)
    _report(kube, name, namespace, 4)
    kube.wait_phase(name, namespace, "Training")
    # Suspended: the progress stays for the record, the ETA goes.
    kube.patch("vft", name, namespace, {"spec": {"suspend": True}})
    kube.wait_phase(name, namespace, "Suspended")
    wait_for(
        lambda: "eta" not in ((kube.vft(name, namespace) or {})["status"].get("progress") or {}),
        timeout=20,
        what="no ETA while suspended",
    )
    assert (kube.vft(name, namespace) or {})["status"]["progress"]["step"] == 4
    # Resumed: a new attempt, with no progress until its pod reports.
    kube.patch("vft", name, namespace, {"spec": {"suspend": False}})
    second = kube.wait_pod(name, namespace, exclude={first["metadata"]["name"]}, timeout=60)
    _initializing_without_progress(kube, name, namespace)
    _report(kube, name, namespace, 5)
    kube.wait_phase(name, namespace, "Training")
    # A Job deleted by hand is made again: again a new attempt.
    kube.run("delete", "job", names.job_name(name), "-n", namespace, "--wait=true", timeout=60)
    kube.wait_pod(
        name, namespace, exclude={first["metadata"]["name"], second["metadata"]["name"]}, timeout=60
    )
    _initializing_without_progress(kube, name, namespace)
    initializing = [e for e in kube.events(namespace, name) if e["reason"] == "Initializing"]
    # One Event per transition into Initializing: the start, the resume, the re-created Job.
    assert len(initializing) == 3, [(e["reason"], e["message"]) for e in kube.events(namespace, name)]


def test_a_failed_run_shows_no_eta(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "fails-late"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 0})))
    pod = kube.wait_pod(name, namespace)
    _report(kube, name, namespace, 6)
    kube.wait_phase(name, namespace, "Training")
    kube.terminate_pod(pod, exit_code=1, reason="Error", message="NCCL timeout")
    kube.wait_phase(name, namespace, "Failed")
    obj = wait_for(
        lambda: (o := kube.vft(name, namespace)) and "eta" not in o["status"]["progress"] and o,
        timeout=20,
        what="no ETA once failed",
    )
    assert "etaSeconds" not in obj["status"]["progress"] and obj["status"]["progress"]["step"] == 6
    header, row = kube.run("get", "vft", name, "-n", namespace).stdout.splitlines()[:2]
    columns = re.split(r"\s{2,}", header.strip())
    cells = dict(zip(columns, re.split(r"\s{2,}", row.strip()), strict=False))
    assert cells.get("ETA", "<none>") in ("<none>", ""), (header, row)


def test_one_event_per_transition_and_a_retry_says_why(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "one-event"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 2})))
    first = kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing")
    kube.report_progress(name, namespace, {"stage": "Downloading"}, names.service_account_name(name))
    _report(kube, name, namespace, 1)
    kube.wait_phase(name, namespace, "Training")
    time.sleep(3)  # several resyncs and the pod's events
    reasons = [e["reason"] for e in kube.events(namespace, name)]
    assert reasons.count("Initializing") == 1 and reasons.count("Training") == 1, reasons
    # The pod fails and the Job retries it: Initializing again, saying which retry and why, and no
    # Training until the new pod reports (the failed pod's progress is not the new one's).
    kube.terminate_pod(first, exit_code=1, reason="Error", message="NCCL timeout")
    kube.wait_pod(name, namespace, exclude={first["metadata"]["name"]}, timeout=60)
    _initializing_without_progress(kube, name, namespace)
    events = sorted(kube.events(namespace, name), key=lambda e: e["metadata"]["creationTimestamp"])
    retried = [e["message"] for e in events if e["reason"] == "Initializing"][1:]
    assert len(retried) == 1 and "retry 1 of 2" in retried[0] and "NCCL timeout" in retried[0], retried
    assert [e["reason"] for e in events].count("Training") == 1, [e["reason"] for e in events]


def test_a_queue_edit_is_applied_before_the_start(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    # (Once the run has started, the CRD refuses the edit: test_cluster_validation.)
    name = "requeued"
    kube.apply(resource(name, namespace, spec(queueName="team-a-small")))
    kube.wait_phase(name, namespace, "Queued")
    kube.patch("vft", name, namespace, {"spec": {"queueName": "team-a-large"}})
    wait_for(
        lambda: (
            (kube.get("job", names.job_name(name), namespace) or {})["metadata"]["labels"].get(
                "kueue.x-k8s.io/queue-name"
            )
            == "team-a-large"
        ),
        timeout=30,
        what="the Job in the new queue",
    )
    obj = wait_for(
        lambda: (o := kube.vft(name, namespace)) and "team-a-large" in o["status"]["message"] and o,
        timeout=30,
        what="the status naming the new queue",
    )
    assert obj["status"]["phase"] == "Queued" and kstatus_of(obj) == "InProgress"


def test_a_name_another_owner_holds_is_reported_and_left_alone(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "taken"
    holder = kube.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "holder", "namespace": namespace}}
    )
    assert holder.returncode == 0
    owner = kube.get("configmap", "holder", namespace)
    assert owner is not None
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": names.job_name(name),
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "holder",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "suspend": True,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
            },
        },
    }
    kube.apply(foreign)
    kube.apply(resource(name, namespace))
    _assert_reported(
        kube,
        name,
        namespace,
        cond.REASON_CHILD_REJECTED,
        (
            f"Job {namespace}/{names.job_name(name)}",
            "controlled by ConfigMap holder",
            "rename this VisionFineTune",
        ),
        kstatus="Failed",
    )
    # Nothing of the run was made beside the foreign Job, and the foreign Job is untouched.
    assert _children(kube, name, namespace) == [f"job/{names.job_name(name)}"]
    job = kube.get("job", names.job_name(name), namespace) or {}
    assert job["metadata"]["ownerReferences"][0]["name"] == "holder" and job["spec"]["suspend"] is True
    # Once the name is free, the run starts (its retries back off, within a minute).
    kube.run("delete", "job", names.job_name(name), "-n", namespace, "--wait=true", timeout=60)
    kube.wait_phase(name, namespace, "Initializing", "Training", timeout=90)
