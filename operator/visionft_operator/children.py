"""Pure functions from a VisionFineTune to the objects it owns: ConfigMap, Job, ServiceAccount, Role and
RoleBinding. No API calls here: ``reconciler.py`` creates (or adopts) what these return.

Every child carries an ownerReference to the resource (controller, blockOwnerDeletion), so the garbage
collector removes it with the resource: the operator needs no finalizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from visionft_api import (
    API_VERSION,
    KIND,
    PLURAL,
    RuntimeSettings,
    StatusTarget,
    TrainerConfig,
    VisionFineTuneSpec,
)
from visionft_api.resource import GROUP, KUEUE_QUEUE_LABEL

from visionft_operator import constants as c
from visionft_operator import deadline, names


@dataclass(frozen=True)
class Owner:
    """The VisionFineTune that owns the children, and what its run has used so far, which a new Job
    carries: how many times its group was restarted (status.restarts; multi-node, see ``gang.py``), how many
    trainer pods its earlier Jobs started (status.attempts) and how many seconds passed since it first
    started (for the deadline, see ``deadline.py``)."""

    namespace: str
    name: str
    uid: str
    restarts: int = 0
    attempts: int = 0
    elapsed: int = 0


@dataclass(frozen=True)
class PodDefaults:
    """Settings that come from the operator (config and policy), not from the resource."""

    image: str = "ghcr.io/visionft/trainer:0.1.0"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str | None = None
    tmp_size: str = "4Gi"
    shm_size: str = "8Gi"
    pod_annotations: dict[str, str] = field(default_factory=dict)


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(owner: Owner) -> dict[str, str]:
    """Labels of every child (and of the pods); the name's label value is shortened to fit
    (``names.label_value``)."""
    return {
        c.LABEL_NAME: names.label_value(owner.name),
        c.LABEL_COMPONENT: "trainer",
        c.LABEL_MANAGED_BY: c.COMPONENT,
        c.LABEL_PART_OF: c.PART_OF,
    }


def _metadata(owner: Owner, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }


def trainer_config(owner: Owner, spec: VisionFineTuneSpec) -> TrainerConfig:
    """The trainer's config: the recipe part of the spec plus where to work and whom to report to (the
    local ``visionft-train MANIFEST`` builds its config the same way). Without ``spec.output`` (a generated
    model), the results stay in ``<workDir>/output`` on the scratch volume."""
    runtime = RuntimeSettings(
        work_dir=f"{c.SCRATCH_MOUNT}/work",
        json_progress=True,
        run_name=owner.name,
        status_target=StatusTarget(namespace=owner.namespace, name=owner.name),
    )
    return TrainerConfig.from_recipe(spec, runtime)


def config_map(owner: Owner, spec: VisionFineTuneSpec) -> dict[str, Any]:
    """The ConfigMap with the trainer config as JSON. It never holds a secret: the spec only names the
    Secret, and the credentials reach the pod as environment variables."""
    text = json.dumps(trainer_config(owner, spec).to_dict(), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, names.config_map_name(owner.name)),
        "data": {c.CONFIG_FILE: text + "\n"},
    }


def service_account(owner: Owner) -> dict[str, Any]:
    """The trainer pod's identity: it may only report this one resource's status."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(owner, names.service_account_name(owner.name)),
        "automountServiceAccountToken": False,
    }


def role(owner: Owner) -> dict[str, Any]:
    """Only ``get`` and ``patch`` on this resource's status subresource (resourceNames)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(owner, names.role_name(owner.name)),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [owner.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def role_binding(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(owner, names.role_name(owner.name)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.role_name(owner.name),
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": names.service_account_name(owner.name),
                "namespace": owner.namespace,
            }
        ],
    }


def _env(spec: VisionFineTuneSpec) -> list[dict[str, Any]]:
    scratch = c.SCRATCH_MOUNT
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": f"{scratch}/home"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": f"{scratch}/cache"},
        {"name": "HF_HOME", "value": f"{scratch}/cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{scratch}/cache/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{scratch}/cache/inductor"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "VISIONFT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "VISIONFT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    storage = spec.storage
    if storage.credentials_secret:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", storage.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", storage.secret_access_key_key),
        ):
            env.append(
                {
                    "name": var,
                    "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
                }
            )
    if storage.ca_bundle_config_map:
        env.append({"name": "AWS_CA_BUNDLE", "value": f"{c.CA_MOUNT}/ca.crt"})
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is not None and mlflow.token_secret:
        # The tracking server's token: referenced like the S3 keys, never in the ConfigMap.
        secret = {"secretKeyRef": {"name": mlflow.token_secret, "key": mlflow.token_key}}
        env.append({"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": secret})
    return env


def _resources(spec: VisionFineTuneSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpus_per_node:
        # Extended resources must have equal requests and limits.
        requests["nvidia.com/gpu"] = str(res.gpus_per_node)
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {"requests": requests, "limits": limits}


RENDEZVOUS_PORT = 29500


def launch_command(owner: Owner, spec: VisionFineTuneSpec) -> list[str]:
    """The container's command: the trainer CLI itself on one GPU, else torchrun over it.

    One process per GPU. Several nodes use a static rendezvous at the index-0 pod, whose stable DNS name
    the headless Service gives (``<job>-0.<service>``); each pod's node rank is its completion index. The
    ``$(VAR)`` references are expanded by the kubelet from the container's env (see ``_torchrun_env``).
    """
    cli = ["--config", f"{c.CONFIG_MOUNT}/{c.CONFIG_FILE}"]
    res = spec.resources
    if res.nodes == 1 and res.gpus_per_node <= 1:
        return ["visionft-train", *cli]
    launcher = ["torchrun", f"--nproc-per-node={max(res.gpus_per_node, 1)}"]
    if res.nodes == 1:
        launcher.append("--standalone")
    else:
        launcher += [
            f"--nnodes={res.nodes}",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
    return [*launcher, "-m", "visionft.cli", *cli]


def _torchrun_env(owner: Owner, spec: VisionFineTuneSpec) -> list[dict[str, Any]]:
    """What torchrun needs on several nodes: the rank-0 pod's address and this pod's node rank."""
    if spec.resources.nodes == 1:
        return []
    job = names.job_name(owner.name)
    return [
        {"name": "MASTER_ADDR", "value": f"{job}-0.{job}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
    ]


def _one_pod_per_node(owner: Owner) -> dict[str, Any]:
    """Pods of one multi-node run never share a node: each holds a whole node's worth of GPUs."""
    return {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {c.LABEL_NAME: names.label_value(owner.name)}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }


def pod_template(owner: Owner, spec: VisionFineTuneSpec, defaults: PodDefaults) -> dict[str, Any]:
    """The training pod: non-root, no privilege escalation, seccomp RuntimeDefault, no capabilities, a
    read-only root filesystem with emptyDir scratch, /tmp and /dev/shm (Pod Security "restricted")."""
    res = spec.resources
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map_name(owner.name)}},
        {"name": "scratch", "emptyDir": {"sizeLimit": res.scratch_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": defaults.tmp_size}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": defaults.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": c.CONFIG_MOUNT, "readOnly": True},
        {"name": "scratch", "mountPath": c.SCRATCH_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.storage.ca_bundle_config_map:
        volumes.append({"name": "ca", "configMap": {"name": spec.storage.ca_bundle_config_map}})
        mounts.append({"name": "ca", "mountPath": c.CA_MOUNT, "readOnly": True})
    container = {
        "name": c.CONTAINER_NAME,
        "image": spec.image or defaults.image,
        "imagePullPolicy": "IfNotPresent",
        "command": launch_command(owner, spec),
        "env": _env(spec) + _torchrun_env(owner, spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "workingDir": c.SCRATCH_MOUNT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRAINER_UID,
            "runAsGroup": c.TRAINER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account_name(owner.name),
        # The trainer reports progress with this token; the ServiceAccount itself doesn't automount.
        "automountServiceAccountToken": True,
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRAINER_UID,
            "runAsGroup": c.TRAINER_UID,
            "fsGroup": c.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = {**defaults.node_selector, **res.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [*defaults.tolerations, *(t.to_dict() for t in res.tolerations)]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if res.nodes > 1:
        pod_spec["affinity"] = _one_pod_per_node(owner)
    priority = res.priority_class_name or defaults.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    # The whole name, which the label may not hold: the operator finds a pod's run by it.
    annotations = {**defaults.pod_annotations, c.ANNOTATION_NAME: owner.name}
    return {"metadata": {"labels": labels(owner), "annotations": annotations}, "spec": pod_spec}


def pod_failure_policy(multi_node: bool = False) -> dict[str, Any]:
    """One pod: disruptions (preemption, node drain or loss: the DisruptionTarget condition) never count
    against backoffLimit, exit codes that mean "bad config" fail the Job at once, other failures are
    retried in a new pod.

    Several nodes: every pod failure fails the Job, so that the Job controller stops the peers at once
    (torchrun's static rendezvous can't take in one replaced rank). The rules still tell the three cases
    apart in the Job's failure message (the rule index), and ``gang.py`` then restarts the whole group in
    a new Job: uncounted after a disruption, counted against runPolicy.backoffLimit after another failure,
    never after a non-retryable exit code. A failure with no exit code (the pod never ran) matches no
    rule and fails the Job through its backoffLimit 0; ``gang.py`` counts it like an exit code."""
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    fatal = {"containerName": c.CONTAINER_NAME, "operator": "In", "values": list(c.NON_RETRYABLE_EXIT_CODES)}
    if not multi_node:
        return {
            "rules": [
                {"action": "Ignore", "onPodConditions": disrupted},
                {"action": "FailJob", "onExitCodes": fatal},
            ]
        }
    return {
        "rules": [
            {"action": "FailJob", "onPodConditions": disrupted},
            {"action": "FailJob", "onExitCodes": fatal},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": c.CONTAINER_NAME, "operator": "NotIn", "values": [0]},
            },
        ]
    }


def job(owner: Owner, spec: VisionFineTuneSpec, defaults: PodDefaults) -> dict[str, Any]:
    """The batch/v1 Job. With ``queueName`` it carries Kueue's queue label and starts suspended (Kueue
    unsuspends it on admission); with ``suspend`` it starts suspended too. Over several nodes it is one
    attempt of the group: it fails on the first pod failure, and the operator replaces it (``gang.py``). A
    Job that replaces an earlier one gets what is left of the run's deadline (``deadline.py``) and carries
    what the earlier Jobs used (annotations)."""
    extra = {KUEUE_QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        "suspend": bool(spec.suspend or spec.queue_name),
        "backoffLimit": spec.run_policy.backoff_limit,
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": pod_failure_policy(multi_node=nodes > 1),
        # (The default with a podFailurePolicy, spelled out.) A replacement pod starts only once the pod it
        # replaces has stopped, so the two never hold GPUs at the same time.
        "podReplacementPolicy": "Failed",
        "template": pod_template(owner, spec, defaults),
    }
    metadata = _metadata(owner, names.job_name(owner.name), extra)
    if nodes > 1:
        # One pod per node with a stable index and DNS name (<job>-<index>.<service>) for torchrun.
        job_spec["completionMode"] = "Indexed"
        job_spec["template"]["spec"]["subdomain"] = names.job_name(owner.name)
        # The first pod failure fails the Job; the operator restarts the group (gang.py), which counts the
        # restarts against runPolicy.backoffLimit itself.
        job_spec["backoffLimit"] = 0
    annotations = {c.ANNOTATION_RESTARTS: str(owner.restarts)} if nodes > 1 else {}
    if owner.attempts:
        annotations[c.ANNOTATION_ATTEMPTS] = str(owner.attempts)
    if owner.elapsed:
        annotations[c.ANNOTATION_ELAPSED] = str(owner.elapsed)
    if annotations:
        metadata["annotations"] = annotations
    job_deadline = deadline.job_deadline(spec, owner.elapsed)
    if job_deadline is not None:
        job_spec["activeDeadlineSeconds"] = job_deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def headless_service(owner: Owner) -> dict[str, Any]:
    """For multi-node runs: gives each indexed pod a DNS name, so rank 0 is reachable by the others."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, names.job_name(owner.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_NAME: names.label_value(owner.name)},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def all_children(owner: Owner, spec: VisionFineTuneSpec, defaults: PodDefaults) -> list[dict[str, Any]]:
    """In creation order: the identity and config first, the Job (which starts pods) last."""
    objs = [service_account(owner), role(owner), role_binding(owner), config_map(owner, spec)]
    if spec.resources.nodes > 1:
        objs.append(headless_service(owner))
    objs.append(job(owner, spec, defaults))
    return objs
