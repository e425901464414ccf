"""The rendered children (no cluster): names, ownership, the Job's security and scheduling, the ConfigMap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from visionft_api import TrainerConfig, VisionFineTuneSpec
from visionft_operator import children, names

from tests.operator.specs import spec

OWNER = children.Owner(namespace="team-a", name="latex-ocr", uid="1234")
REPO = Path(__file__).resolve().parents[2]


def _spec(**kw: object) -> VisionFineTuneSpec:
    return VisionFineTuneSpec.model_validate(spec(**kw))


DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def test_names_are_deterministic_and_fit_a_label() -> None:
    assert names.job_name("latex-ocr") == "latex-ocr-trainer"
    assert names.label_value("latex-ocr") == "latex-ocr"  # names that fit are kept as they are
    long = "x" * 200
    assert names.job_name(long) == names.job_name(long)
    assert len(names.job_name(long)) <= 63
    assert names.job_name(long) != names.job_name("x" * 199)


@pytest.mark.parametrize(
    "name",
    [
        "a" * 253,
        "a" * 62 + "." + "b" * 190,  # a dot where the label value is cut
        "0run",  # a leading digit: no Service or multi-node host name takes it as it is
        "run.v2",  # a dot: neither
        "a-" * 31 + "b",  # a dash where the child name is cut
        ("x." * 126) + "y",
    ],
)
def test_any_resource_name_gives_valid_child_names_and_label_values(name: str) -> None:
    for suffix in ("trainer", "config"):
        child = names.child_name(name, suffix)
        assert DNS_1035_LABEL.match(child), child
        assert child == names.child_name(name, suffix)
    assert LABEL_VALUE.match(names.label_value(name)), names.label_value(name)
    # Names that differ give different children and label values, even where their heads agree.
    other = name[:-1] + ("c" if name[-1] != "c" else "d")
    assert names.job_name(other) != names.job_name(name)
    assert names.label_value(other) != names.label_value(name) or (len(name) <= 63 and other == name)


def test_a_long_name_runs_under_its_shortened_label() -> None:
    owner = children.Owner(namespace="team-a", name="n" * 253, uid="1234")
    spec_ = _spec(**{"resources.nodes": 2, "resources.gpusPerNode": 8})
    short = names.label_value(owner.name)
    for obj in children.all_children(owner, spec_, children.PodDefaults()):
        assert obj["metadata"]["labels"]["visionft.io/name"] == short
    job = children.job(owner, spec_, children.PodDefaults())
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["visionft.io/name"] == short
    assert template["metadata"]["annotations"]["visionft.io/name"] == owner.name  # the whole name
    anti = template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["labelSelector"]["matchLabels"] == {"visionft.io/name": short}
    assert children.headless_service(owner)["spec"]["selector"] == {"visionft.io/name": short}
    assert children.role(owner)["rules"][0]["resourceNames"] == [owner.name]


def test_every_child_is_owned_and_labelled() -> None:
    objs = children.all_children(OWNER, _spec(), children.PodDefaults())
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    for obj in objs:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "visionft.io/v1alpha1",
            "kind": "VisionFineTune",
            "name": "latex-ocr",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["labels"]["visionft.io/name"] == "latex-ocr"


def test_role_allows_only_this_resources_status() -> None:
    (rule,) = children.role(OWNER)["rules"]
    assert rule == {
        "apiGroups": ["visionft.io"],
        "resources": ["visionfinetunes/status"],
        "resourceNames": ["latex-ocr"],
        "verbs": ["get", "patch"],
    }


def test_config_map_holds_the_trainer_config_and_no_secret() -> None:
    cm = children.config_map(OWNER, _spec())
    raw = json.loads(cm["data"]["config.json"])
    config = TrainerConfig.model_validate(raw)
    assert config.runtime.status_target is not None
    assert (config.runtime.status_target.namespace, config.runtime.status_target.name) == (
        "team-a",
        "latex-ocr",
    )
    assert config.runtime.json_progress
    assert config.runtime.work_dir.startswith("/scratch")
    for cluster_field in ("resources", "runPolicy", "queueName", "suspend", "image"):
        assert cluster_field not in raw
    # The Secret is referenced by name, never resolved.
    assert raw["storage"]["credentialsSecret"] == "s3-creds"


def test_job_pod_meets_pod_security_restricted() -> None:
    job = children.job(OWNER, _spec(), children.PodDefaults())
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] > 0
    # Writable scratch, /tmp and caches on emptyDirs; the config read-only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/visionft"]["readOnly"] is True
    assert {"/scratch", "/tmp", "/dev/shm"} <= set(mounts)
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"].startswith("/scratch")
    for volume in pod["volumes"]:
        assert "hostPath" not in volume


def test_job_requests_gpus_and_scheduling_from_spec_and_policy() -> None:
    s = _spec(
        **{
            "resources.gpusPerNode": 2,
            "resources.nodeSelector": {"pool": "h100"},
            "resources.tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "resources.priorityClassName": "training",
        }
    )
    defaults = children.PodDefaults(
        node_selector={"zone": "a"}, tolerations=[{"key": "t", "operator": "Exists"}]
    )
    job = children.job(OWNER, s, defaults)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "2" == resources["limits"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"zone": "a", "pool": "h100"}
    assert {"key": "t", "operator": "Exists"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "training"


def test_job_credentials_come_from_the_users_secret() -> None:
    s = _spec(**{"storage.accessKeyIdKey": "id", "storage.secretAccessKeyKey": "key"})
    env = {
        e["name"]: e
        for e in children.job(OWNER, s, children.PodDefaults())["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "key"}}
    without = _spec(**{"storage.credentialsSecret": None})
    env2 = {
        e["name"]
        for e in children.job(OWNER, without, children.PodDefaults())["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert "AWS_ACCESS_KEY_ID" not in env2


def test_the_tracking_token_comes_from_the_users_secret_and_never_enters_the_config() -> None:
    tracked = _spec(
        tracking={"mlflow": {"uri": "http://mlflow.mlflow.svc:5000", "tokenSecret": "mlflow-token"}}
    )
    container = children.job(OWNER, tracked, children.PodDefaults())["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow-token", "key": "MLFLOW_TRACKING_TOKEN"}
    }
    raw = json.loads(children.config_map(OWNER, tracked)["data"]["config.json"])
    assert raw["tracking"]["mlflow"] == {
        "uri": "http://mlflow.mlflow.svc:5000",
        "experiment": "visionft",
        "tokenSecret": "mlflow-token",
        "tokenKey": "MLFLOW_TRACKING_TOKEN",
        "logAdapter": True,
    }
    assert raw["runtime"]["runName"] == "latex-ocr"
    untracked = children.job(OWNER, _spec(), children.PodDefaults())["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert "MLFLOW_TRACKING_TOKEN" not in {e["name"] for e in untracked["env"]}


def test_job_retries_ignore_disruptions_and_fail_fast_on_config_errors() -> None:
    job = children.job(
        OWNER,
        _spec(**{"runPolicy.backoffLimit": 5, "runPolicy.activeDeadlineSeconds": 3600}),
        children.PodDefaults(),
    )
    js = job["spec"]
    assert js["backoffLimit"] == 5
    assert js["activeDeadlineSeconds"] == 3600
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob"
    assert js["template"]["spec"]["restartPolicy"] == "Never"


def test_queue_name_labels_the_job_and_starts_it_suspended() -> None:
    job = children.job(OWNER, _spec(queueName="team-a-queue"), children.PodDefaults())
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert job["spec"]["suspend"] is True
    plain = children.job(OWNER, _spec(), children.PodDefaults())
    assert plain["spec"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_image_from_spec_or_default() -> None:
    assert (
        children.job(OWNER, _spec(), children.PodDefaults(image="reg/x:1"))["spec"]["template"]["spec"][
            "containers"
        ][0]["image"]
        == "reg/x:1"
    )
    assert (
        children.job(OWNER, _spec(image="mine/y:2"), children.PodDefaults())["spec"]["template"]["spec"][
            "containers"
        ][0]["image"]
        == "mine/y:2"
    )


def test_multi_node_runs_get_an_indexed_job_and_a_headless_service() -> None:
    s = _spec(**{"resources.nodes": 2, "resources.gpusPerNode": 4})
    objs = children.all_children(OWNER, s, children.PodDefaults())
    assert [o["kind"] for o in objs][-2:] == ["Service", "Job"]
    service, job = objs[-2], objs[-1]
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


def test_launch_command_is_the_cli_on_one_gpu_and_torchrun_on_several() -> None:
    one = children.launch_command(OWNER, _spec())
    assert one == ["visionft-train", "--config", "/etc/visionft/config.json"]
    local = children.launch_command(OWNER, _spec(**{"resources.gpusPerNode": 4}))
    assert local[:3] == ["torchrun", "--nproc-per-node=4", "--standalone"]
    assert local[-4:] == ["-m", "visionft.cli", "--config", "/etc/visionft/config.json"]


def test_multi_node_pods_get_the_torchrun_environment_and_one_node_each() -> None:
    s = _spec(**{"resources.nodes": 2, "resources.gpusPerNode": 4})
    job = children.job(OWNER, s, children.PodDefaults())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:6] == [
        "torchrun",
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    ]
    env = {e["name"]: e for e in container["env"]}
    job_name = job["metadata"]["name"]
    # Rank 0's stable DNS name: <job>-0.<headless service>, where the service is named like the Job.
    assert env["MASTER_ADDR"]["value"] == f"{job_name}-0.{job_name}"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_the_quickstart_renders_a_cpu_pod_with_a_generated_model_and_no_output() -> None:
    # examples/quickstart.yaml, as the operator gets it: gpusPerNode 0, builtin:// sources, no output.
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    s = VisionFineTuneSpec.model_validate(doc["spec"])
    assert s.resources.gpus_per_node == 0 and s.output is None
    objs = children.all_children(OWNER, s, children.PodDefaults())
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    pod = objs[-1]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources == {
        "requests": {"cpu": s.resources.cpu, "memory": s.resources.memory},
        "limits": {"memory": s.resources.memory},
    }
    assert "tolerations" not in pod and "nodeSelector" not in pod and "affinity" not in pod
    assert container["command"] == ["visionft-train", "--config", "/etc/visionft/config.json"]
    assert not any(e["name"].startswith("AWS_") for e in container["env"])  # no bucket, no Secret
    config = TrainerConfig.model_validate(json.loads(objs[3]["data"]["config.json"]))
    assert (config.model.uri, config.dataset.uri) == ("builtin://tiny-qwen2-vl", "builtin://shapes")
    assert config.output is None and config.evaluation is not None and config.evaluation.samples == 100
    assert config.runtime.work_dir.startswith("/scratch")  # the results stay on the scratch volume


def test_gpus_per_node_zero_requests_no_gpu_whatever_the_rest() -> None:
    s = _spec(**{"resources.gpusPerNode": 0, "resources.cpu": "500m", "resources.memory": "2Gi"})
    container = children.job(OWNER, s, children.PodDefaults())["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "2Gi"},
    }
    assert container["command"][0] == "visionft-train"
