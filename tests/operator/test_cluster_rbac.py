"""The trainer's identity (issue 5 and 8): its ServiceAccount may patch its own resource's status, not
another's, and may not read Secrets; an operator ServiceAccount with the chart's rules can't get Secrets."""

from __future__ import annotations

from pathlib import Path

import kubernetes
import pytest
import yaml
from visionft_operator.controller.kube import send_bearer_token

from tests.operator.kube import Kube, OperatorProcess, wait_for
from tests.operator.specs import resource

pytestmark = pytest.mark.cluster


def _can(kube: Kube, namespace: str, user: str, *args: str) -> bool:
    result = kube.run("auth", "can-i", *args, "-n", namespace, as_user=user, check=False)
    return result.stdout.strip() == "yes"


def test_trainer_service_account_can_only_patch_its_own_status(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    for name in ("rbac-a", "rbac-b"):
        kube.apply(resource(name, namespace))
    for name in ("rbac-a", "rbac-b"):
        wait_for(
            lambda name=name: kube.get("rolebinding", f"{name}-trainer", namespace), timeout=30, what="RBAC"
        )
    sa = f"system:serviceaccount:{namespace}:rbac-a-trainer"
    assert _can(kube, namespace, sa, "patch", "visionfinetunes.visionft.io/rbac-a", "--subresource=status")
    assert _can(kube, namespace, sa, "get", "visionfinetunes.visionft.io/rbac-a", "--subresource=status")
    assert not _can(
        kube, namespace, sa, "patch", "visionfinetunes.visionft.io/rbac-b", "--subresource=status"
    )
    assert not _can(kube, namespace, sa, "patch", "visionfinetunes.visionft.io/rbac-a")  # not the spec
    assert not _can(kube, namespace, sa, "get", "secrets")
    assert not _can(kube, namespace, sa, "get", "secrets/s3-creds")
    assert not _can(kube, namespace, sa, "list", "secrets")
    assert not _can(kube, namespace, sa, "create", "pods")
    # And really, through the apiserver: its own status yes, another's no.
    kube.report_progress("rbac-a", namespace, {"step": 1, "stage": "Loading"}, "rbac-a-trainer")
    with pytest.raises(AssertionError, match="forbidden"):
        kube.report_progress("rbac-b", namespace, {"step": 1, "stage": "Loading"}, "rbac-a-trainer")


def test_a_service_account_token_authenticates_the_python_client(
    kube: Kube, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The pod's real credential is a ServiceAccount token. kubernetes-client 36.0.0 drops token auth
    (kubernetes-client/python#2584); the operator's client works around it (kube.send_bearer_token)."""
    token = kube.run("create", "token", "rbac-a-trainer", "-n", namespace, "--duration=10m").stdout.strip()
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    path = tmp_path / "token.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=configuration)
    send_bearer_token(configuration)
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
    body = {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {"name": "rbac-a", "namespace": namespace},
        "status": {"progress": {"step": 2, "stage": "Training"}},
    }
    api.patch_namespaced_custom_object_status(
        "visionft.io",
        "v1alpha1",
        namespace,
        "visionfinetunes",
        "rbac-a",
        body,
        field_manager="visionft-trainer",
        force=True,
        _content_type="application/apply-patch+yaml",
    )
    assert kube.vft("rbac-a", namespace)["status"]["progress"]["step"] == 2
