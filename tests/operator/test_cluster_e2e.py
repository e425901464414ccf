"""End to end (issue 5's last acceptance line): the real `visionft-train` CLI runs as a local process
standing in for the training pod's container. It gets the pod spec's command and environment (the Secret's
values resolved as the kubelet would, the ConfigMap and volumes mapped to local folders, a kubeconfig with
the trainer ServiceAccount's token instead of the in-cluster one), reads its dataset and base model from the
real S3 server, pushes real progress into the resource's status through the apiserver, and uploads its
outputs. The resource reaches Succeeded, and `kubectl get vft` shows progress and loss along the way."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.kube import Kube, OperatorProcess, kubectl_binary
from tests.operator.specs import resource

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

PREPARE = """
import sys
from visionft.quickstart import prepare
from visionft.storage import upload_folder
from visionft.storage.client import make_client
from visionft.storage.settings import StorageSettings
root, bucket, endpoint = sys.argv[1], sys.argv[2], sys.argv[3]
prepare(root + "/shapes", root + "/base")
client = make_client(StorageSettings(endpoint_url=endpoint, path_style=True))
upload_folder(root + "/shapes", f"s3://{bucket}/datasets/shapes/", client=client)
upload_folder(root + "/base", f"s3://{bucket}/models/tiny/", client=client)
"""


def _trainer_kubeconfig(kube: Kube, namespace: str, service_account: str, path: Path) -> Path:
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    token = kube.run("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": service_account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "trainer",
                        "context": {"cluster": "test", "user": service_account, "namespace": namespace},
                    }
                ],
                "current-context": "trainer",
            }
        )
    )
    return path


def _container_env(kube: Kube, pod: dict[str, Any], mapping: dict[str, str]) -> dict[str, str]:
    """The container's environment, resolved as the kubelet resolves it."""
    env: dict[str, str] = {}
    for item in pod["spec"]["containers"][0]["env"]:
        if "value" in item:
            value = item["value"]
            for mount, local in mapping.items():
                value = value.replace(mount, local)
            env[item["name"]] = value
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = kube.get("secret", ref["name"], pod["metadata"]["namespace"])
            assert secret is not None
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "fieldRef" in item["valueFrom"]:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = (
                pod["metadata"]["name"] if field == "metadata.name" else pod["metadata"]["namespace"]
            )
    return env


def test_trainer_cli_end_to_end(
    kube: Kube, namespace: str, operator: OperatorProcess, s3_bucket: Any, tmp_path: Path
) -> None:
    server = s3_bucket.server
    bucket = s3_bucket.name
    # The user's data and base model, published to S3 (a tiny random-weight VLM and the shapes dataset).
    prep_env = {k: v for k, v in os.environ.items()}
    prep = subprocess.run(
        [sys.executable, "-c", PREPARE, str(tmp_path / "assets"), bucket, server.endpoint_url],
        env=prep_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "e2e-s3", "namespace": namespace},
            "stringData": {
                "AWS_ACCESS_KEY_ID": server.credentials.access_key,
                "AWS_SECRET_ACCESS_KEY": server.credentials.secret_key,
            },
        }
    )
    name = "e2e"
    body = {
        "model": {"uri": f"s3://{bucket}/models/tiny/", "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 8, "alpha": 8},
        "dataset": {
            "uri": f"s3://{bucket}/datasets/shapes/",
            "format": "imagefolder",
            "maxImagePixels": 3136,
        },
        "training": {
            "maxSteps": 60,
            "perDeviceBatchSize": 4,
            "learningRate": 5e-3,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 3,
            "keepCheckpoints": 1,
            "loggingSteps": 1,
            "optimizations": False,
        },
        "output": {"uri": f"s3://{bucket}/outputs/e2e/", "saveMethod": "lora"},
        "storage": {
            "endpoint": server.endpoint_url,
            "addressingStyle": "path",
            "credentialsSecret": "e2e-s3",
        },
        "resources": {"gpusPerNode": 1, "cpu": "1", "memory": "1Gi", "scratchSize": "2Gi"},
    }
    kube.apply(resource(name, namespace, body))
    pod = kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing")

    # The pod's volumes on local disk: the ConfigMap's file, the scratch and /tmp emptyDirs.
    container = pod["spec"]["containers"][0]
    config_map = kube.get("configmap", f"{name}-config", namespace)
    assert config_map is not None
    mapping = {
        "/etc/visionft": str(tmp_path / "config"),
        "/scratch": str(tmp_path / "scratch"),
        "/tmp": str(tmp_path / "tmp"),
    }
    for local in mapping.values():
        Path(local).mkdir(parents=True, exist_ok=True)
    config_text = config_map["data"]["config.json"].replace('"/scratch', f'"{mapping["/scratch"]}')
    (tmp_path / "config" / "config.json").write_text(config_text)
    command = [part.replace("/etc/visionft", mapping["/etc/visionft"]) for part in container["command"]]
    env = _container_env(kube, pod, mapping)
    assert env["AWS_SECRET_ACCESS_KEY"] == server.credentials.secret_key  # from the user's Secret
    env.update(
        PATH=os.environ["PATH"],
        KUBECONFIG=str(
            _trainer_kubeconfig(kube, namespace, pod["spec"]["serviceAccountName"], tmp_path / "kubeconfig")
        ),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    command[0] = str(Path(sys.executable).parent / command[0])

    # `kubectl get vft -w` prints the row at every change of the resource, as a user watching would see.
    watcher = subprocess.Popen(
        [
            kubectl_binary(),
            "--kubeconfig",
            kube.kubeconfig,
            "get",
            "vft",
            name,
            "-n",
            namespace,
            "-w",
            "--no-headers",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    log = tmp_path / "trainer.log"
    with log.open("w") as out:
        result = subprocess.run(
            command, env=env, cwd=mapping["/scratch"], stdout=out, stderr=subprocess.STDOUT, timeout=900
        )
    assert result.returncode == 0, log.read_text()[-4000:]
    # The container exited 0: the kubelet reports it, the Job completes.
    kube.terminate_pod(pod, exit_code=0)
    obj = kube.wait_phase(name, namespace, "Succeeded", timeout=60)
    time.sleep(1)
    watcher.terminate()
    seen = [line.strip() for line in watcher.communicate(timeout=10)[0].splitlines() if line.strip()]
    progress = obj["status"].get("progress")
    assert progress, (
        "the trainer pushed no progress into the status; its log says:\n"
        + "\n".join(line for line in log.read_text().splitlines() if "report progress" in line)[:2000]
        + "\n(kubernetes-client 36.0.0 sends token-authenticated requests as system:anonymous: "
        "kubernetes-client/python#2584; the trainer's reporting needs visionft_operator.kube.send_bearer_token's "
        "workaround or kubernetes>=36.0.2)"
    )
    assert progress["step"] == 60 and progress["totalSteps"] == 60 and progress["loss"] > 0
    assert obj["status"]["outputs"]["adapterUri"] == f"s3://{bucket}/outputs/e2e/adapter/"
    keys = [
        o["Key"]
        for o in server.client().list_objects_v2(Bucket=bucket, Prefix="outputs/e2e/").get("Contents", [])
    ]
    assert any(k.startswith("outputs/e2e/adapter/") for k in keys), keys
    # `kubectl get vft` showed the run in training with its progress and loss.
    training = [line for line in seen if " Training " in f" {line} " and "/60 (" in line]
    assert training, seen
    assert any(len(line.split()) >= 5 for line in training), training  # NAME PHASE PROGRESS LOSS ETA AGE
    print("\nkubectl get vft along the way:\n" + "\n".join(seen))
    # No planted credential in the trainer's log, the resource or the ConfigMap.
    for text in (log.read_text(), json.dumps(obj), json.dumps(config_map)):
        assert server.credentials.secret_key not in text
