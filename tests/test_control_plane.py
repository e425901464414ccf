"""The test control plane behaves like a real cluster: these tests prove the parts the operator needs.

They run against the real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok of the
`control_plane` fixture (tests/harness/kube.py), with a small CRD of their own.
"""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.kube import (
    ANN_DURATION,
    ANN_EXIT_CODE,
    ANN_FAIL,
    ANN_FAIL_MESSAGE,
    ANN_FAIL_REASON,
    DEFAULT_GPU_PRODUCT,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    ControlPlane,
    wait_for,
)

pytestmark = pytest.mark.cluster

GROUP = "test.visionft.io"


def widget_crd(plural: str) -> dict[str, Any]:
    """A namespaced CRD `<plural>.test.visionft.io` with an OpenAPI schema and a CEL rule."""
    kind = plural.capitalize().rstrip("s")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural.rstrip("s"), "kind": kind},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                        "color": {"type": "string", "enum": ["red", "blue"]},
                                        "maxSize": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "!has(self.maxSize) || self.size <= self.maxSize",
                                            "message": "size must not exceed maxSize",
                                        }
                                    ],
                                },
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def widgets(control_plane: ControlPlane) -> Any:
    """Install a fresh widget CRD, wait until it is Established, and yield its (group, version, plural)."""
    ext = client.ApiextensionsV1Api(control_plane.client())
    plural = f"widgets{uuid.uuid4().hex[:6]}"
    crd = widget_crd(plural)
    ext.create_custom_resource_definition(crd)

    def established() -> bool:
        status = ext.read_custom_resource_definition(crd["metadata"]["name"]).status
        return any(c.type == "Established" and c.status == "True" for c in status.conditions or ())

    wait_for(established, timeout=30, what="CRD Established")
    try:
        yield GROUP, "v1alpha1", plural
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])


def test_crd_schema_and_cel_are_enforced(control_plane: ControlPlane, namespace: str, widgets: Any) -> None:
    group, version, plural = widgets
    custom = client.CustomObjectsApi(control_plane.client())
    kind = widget_crd(plural)["spec"]["names"]["kind"]

    def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": {"name": name}, "spec": spec}

    created = custom.create_namespaced_custom_object(
        group, version, namespace, plural, widget("ok", {"size": 3, "color": "red"})
    )
    assert created["metadata"]["uid"]
    fetched = custom.get_namespaced_custom_object(group, version, namespace, plural, "ok")
    assert fetched["spec"] == {"size": 3, "color": "red"}

    bad: dict[str, dict[str, Any]] = {
        "too-big": {"size": 11},
        "wrong-type": {"size": "three"},
        "bad-enum": {"size": 1, "color": "green"},
        "missing-required": {"color": "red"},
        "cel-rule": {"size": 5, "maxSize": 4},
    }
    for name, spec in bad.items():
        with pytest.raises(ApiException) as info:
            custom.create_namespaced_custom_object(group, version, namespace, plural, widget(name, spec))
        assert info.value.status == 422, (name, info.value.body)
    assert "size must not exceed maxSize" in info.value.body  # the CEL rule's message reaches the client

    # The status subresource: a status write through /status lands; spec is untouched.
    custom.patch_namespaced_custom_object_status(
        group, version, namespace, plural, "ok", {"status": {"phase": "Ready"}}
    )
    fetched = custom.get_namespaced_custom_object(group, version, namespace, plural, "ok")
    assert fetched["status"] == {"phase": "Ready"} and fetched["spec"]["size"] == 3


def gpu_job(name: str, annotations: dict[str, str] | None = None, backoff_limit: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "visionft/trainer:test",
                            "resources": {"limits": {GPU_RESOURCE: "1"}, "requests": {"cpu": "1"}},
                        }
                    ],
                },
            },
        },
    }


def job_condition(batch: client.BatchV1Api, name: str, namespace: str, kind: str) -> Any:
    job = batch.read_namespaced_job_status(name, namespace)
    return next((c for c in job.status.conditions or () if c.type == kind and c.status == "True"), None)


def test_gpu_job_is_scheduled_runs_and_completes(control_plane: ControlPlane, namespace: str) -> None:
    api = control_plane.client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, gpu_job("train", {ANN_DURATION: "2s"}))

    def pod() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=train").items
        return pods[0] if pods else None

    bound = wait_for(lambda: (p := pod()) and p.spec.node_name and p, timeout=30, what="pod bound")
    node = core.read_node(bound.spec.node_name)
    assert node.metadata.labels[GPU_PRODUCT_LABEL] == DEFAULT_GPU_PRODUCT
    assert node.status.allocatable[GPU_RESOURCE] == "8"
    scheduled = next(c for c in bound.status.conditions if c.type == "PodScheduled")
    assert scheduled.status == "True"

    wait_for(lambda: pod().status.phase == "Running", timeout=30, what="pod Running")
    finished = wait_for(
        lambda: (p := pod()).status.phase == "Succeeded" and p, timeout=30, what="pod Succeeded"
    )
    assert finished.status.container_statuses[0].state.terminated.exit_code == 0
    wait_for(lambda: job_condition(batch, "train", namespace, "Complete"), timeout=30, what="Job Complete")
    assert batch.read_namespaced_job_status("train", namespace).status.succeeded == 1


def test_pod_annotated_to_fail_fails_with_its_reason(control_plane: ControlPlane, namespace: str) -> None:
    api = control_plane.client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    annotations = {
        ANN_FAIL: "true",
        ANN_FAIL_REASON: "OOMKilled",
        ANN_FAIL_MESSAGE: "CUDA out of memory",
        ANN_EXIT_CODE: "137",
        ANN_DURATION: "500ms",
    }
    batch.create_namespaced_job(namespace, gpu_job("crash", annotations))

    def failed_pod() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=crash").items
        return next((p for p in pods if p.status.phase == "Failed"), None)

    pod = wait_for(failed_pod, timeout=30, what="pod Failed")
    assert pod.status.reason == "OOMKilled"
    assert pod.status.message == "CUDA out of memory"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")
    failed = wait_for(
        lambda: job_condition(batch, "crash", namespace, "Failed"), timeout=30, what="Job Failed"
    )
    assert failed.reason == "BackoffLimitExceeded"


def test_rbac_denies_a_service_account_without_a_role(control_plane: ControlPlane, namespace: str) -> None:
    api = control_plane.client()
    rbac = client.RbacAuthorizationV1Api(api)
    robot = control_plane.as_service_account(namespace, "robot")
    assert robot.name == f"system:serviceaccount:{namespace}:robot"
    robot_core = client.CoreV1Api(robot.client())

    with pytest.raises(ApiException) as info:
        robot_core.list_namespaced_config_map(namespace)
    assert info.value.status == 403
    can_i = robot.kubectl("auth", "can-i", "list", "configmaps", "-n", namespace, check=False)
    assert (can_i.returncode, can_i.stdout.strip()) == (1, "no")

    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "robot-reads-configmaps"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}],
        },
    )
    wait_for(
        lambda: robot_core.list_namespaced_config_map(namespace), timeout=10, what="list allowed by the Role"
    )
    assert robot.kubectl("auth", "can-i", "list", "configmaps", "-n", namespace).stdout.strip() == "yes"
    # The Role grants reading only, and only in its namespace.
    with pytest.raises(ApiException) as info:
        robot_core.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}})
    assert info.value.status == 403
    with pytest.raises(ApiException) as info:
        robot_core.list_namespaced_config_map("default")
    assert info.value.status == 403


def test_users_groups_and_impersonation(control_plane: ControlPlane, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(control_plane.client())
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "ml-team-views"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "ml-team"}],
        },
    )
    for identity in (
        control_plane.as_user("alice", groups=["ml-team"]),
        control_plane.impersonate("bob", groups=["ml-team", "other"]),
    ):
        core = client.CoreV1Api(identity.client())
        wait_for(
            lambda core=core: core.list_namespaced_pod(namespace),  # type: ignore[misc]
            timeout=10,
            what=f"{identity.name} may view",
        )
        with pytest.raises(ApiException) as info:
            core.delete_namespace(namespace)
        assert info.value.status == 403
        assert identity.kubectl("auth", "can-i", "get", "pods", "-n", namespace).stdout.strip() == "yes"
        assert (
            identity.kubectl("auth", "can-i", "delete", "pods", "-n", namespace, check=False).returncode == 1
        )
        whoami = identity.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
        assert whoami == identity.name
    stranger = control_plane.impersonate("carol")
    assert (
        stranger.kubectl("auth", "can-i", "get", "pods", "-n", namespace, check=False).stdout.strip() == "no"
    )


def test_kubectl_auth_can_i_as_admin(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"
    version = control_plane.kubectl("version", "-o", "json").stdout
    assert '"serverVersion"' in version


def test_deleting_an_owner_garbage_collects_its_children(control_plane: ControlPlane, namespace: str) -> None:
    api = control_plane.client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "blockOwnerDeletion": True,
    }
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    core.create_namespaced_service_account(
        namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    job = gpu_job("child", {ANN_DURATION: "1h"})
    job["metadata"]["ownerReferences"] = [reference]
    batch.create_namespaced_job(namespace, job)
    wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=child").items,
        timeout=30,
        what="the child Job's pod",
    )

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")

    def gone() -> bool:
        left = [
            core.list_namespaced_config_map(namespace, field_selector="metadata.name=child").items,
            core.list_namespaced_service_account(namespace, field_selector="metadata.name=child").items,
            batch.list_namespaced_job(namespace).items,
            core.list_namespaced_pod(namespace).items,
            core.list_namespaced_config_map(namespace, field_selector="metadata.name=owner").items,
        ]
        return not any(left)

    wait_for(gone, timeout=60, what="owner and children (Job and its pod too) garbage-collected")


def test_apiserver_and_etcd_restart(control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.client())
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}, "data": {"k": "v"}})
    control_plane.restart_etcd()
    control_plane.restart_apiserver()
    assert wait_for(lambda: core.read_namespaced_config_map("before", namespace), timeout=30).data == {
        "k": "v"
    }
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}})
    # The controllers reconnected too: a new Job still runs to completion on a fake node.
    batch = client.BatchV1Api(control_plane.client())
    batch.create_namespaced_job(namespace, gpu_job("after-restart"))
    wait_for(
        lambda: job_condition(batch, "after-restart", namespace, "Complete"), timeout=60, what="Job Complete"
    )


def test_kubectl_apply_and_wait(control_plane: ControlPlane, namespace: str) -> None:
    manifest = f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: applied, namespace: {namespace}}}
data: {{answer: "42"}}
"""
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    got = control_plane.kubectl(
        "get", "configmap", "applied", "-n", namespace, "-o", "jsonpath={.data.answer}"
    )
    assert got.stdout == "42"
    nodes = control_plane.kubectl(
        "get", "nodes", "-l", f"{GPU_PRODUCT_LABEL}={DEFAULT_GPU_PRODUCT}", "-o", "name"
    )
    assert len(nodes.stdout.split()) >= 2
    with pytest.raises(subprocess.CalledProcessError):
        control_plane.kubectl("get", "configmap", "does-not-exist", "-n", namespace)


def test_helm_installs_a_chart(control_plane: ControlPlane, namespace: str, tmp_path: Any) -> None:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("answer: 41\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: '{{ .Release.Name }}'}\n"
        "data: {answer: '{{ .Values.answer }}'}\n"
    )
    control_plane.helm("install", "tiny", str(chart), "-n", namespace, "--set", "answer=42", "--wait")
    data = client.CoreV1Api(control_plane.client()).read_namespaced_config_map("tiny", namespace).data
    assert data == {"answer": "42"}
    assert "tiny" in control_plane.helm("list", "-n", namespace, "-q").stdout.split()
