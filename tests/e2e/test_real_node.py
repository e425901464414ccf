"""End to end on a real node: the chart's operator and the trainer run as real pods of the locally built images.

What runs: the harness's control plane with a real node beside the kwok GPU nodes (tests/harness/node.py:
kubelet, containerd, runc, a CNI bridge), an S3 server on the pod network's gateway, and nothing standing in
for anything. As a user would:

1. `helm install` of charts/visionft with the images of hack/build-images.sh (`imagePullPolicy: Never`)
   into a namespace labelled Pod Security `restricted`: the operator runs as a pod on the real node, with
   the chart's ServiceAccount, in-cluster config and restricted securityContext.
2. `kubectl apply -f examples/quickstart.yaml` into another `restricted` namespace: the operator's Job
   starts the trainer image's pod on the real node, which pushes progress into the resource's status under
   its own ServiceAccount, and the resource reaches Succeeded; the pod's log shows its held-out accuracy
   rise.
3. A run with its data, base model and outputs in S3 and the credentials in a Secret: its trainer pod is
   killed in the middle of the run (SIGKILL of the container's process, as a crash or the OOM killer would);
   the Job starts a new pod, which resumes from the newest complete checkpoint in S3, and the outputs and
   their manifest land in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_end_to_end import (
    MANIFEST,
    SECRET_NAME,
    TRAINER_FIELD_MANAGER,
    create_namespace,
    get_or_none,
    kjson,
    kubectl,
    parse_table,
    publish_inputs,
    run_checked,
    vft_spec,
    wait_for,
)
from tests.harness.node import NODE_NAME, NodeControlPlane
from tests.harness.s3 import SeaweedS3

pytestmark = [pytest.mark.node, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "visionft"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
RELEASE, OPERATOR_NS = "visionft", "visionft-system"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
OPERATOR_SELECTOR = f"app.kubernetes.io/name=visionft,app.kubernetes.io/instance={RELEASE}"
#: How long one run may take, from apply to a final phase, on a loaded 2-core machine.
RUN_TIMEOUT_S = 900
RESUMED = re.compile(r"resuming from (s3://\S+) \(step (\d+)\)")


# --------------------------------------------------------------------------------------------- helpers
def watch(
    plane: NodeControlPlane, namespace: str, name: str, timeout: float = RUN_TIMEOUT_S
) -> list[dict[str, str]]:
    """Every change of `kubectl get vft NAME -o wide` until the phase is final; fails on time-out."""
    rows: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = parse_table(plane.kubectl("get", "vft", name, "-n", namespace, "-o", "wide").stdout)
        row = {k: v for k, v in table[0].items() if k != "AGE"}
        if not rows or row != rows[-1]:
            rows.append(row)
        if row["PHASE"] in ("Succeeded", "Failed"):
            return rows
        time.sleep(2)
    pytest.fail(
        f"{namespace}/{name} did not finish in {timeout:.0f} s:\n{diagnosis(plane, namespace, name)}\n{rows}"
    )


def diagnosis(plane: NodeControlPlane, namespace: str, name: str) -> str:
    obj = get_or_none(plane, "get", "vft", name, "-n", namespace) or {}
    events = plane.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    pods = plane.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
    operator = plane.kubectl(
        "logs", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR, "--tail=40", check=False
    ).stdout
    trainer = plane.kubectl(
        "logs", "-n", namespace, "-l", f"visionft.io/name={name}", "--tail=40", check=False
    )
    return (f"status: {json.dumps(obj.get('status'), indent=1)}\nevents:\n{events}\npods:\n{pods}\n"
            f"operator log:\n{operator}\ntrainer log:\n{trainer.stdout}{trainer.stderr}")  # fmt: skip


def assert_trained(rows: list[dict[str, str]], total: int) -> None:
    """The table showed Training with a mid-run step, a numeric loss and an ETA, and ended Succeeded."""
    assert rows[-1]["PHASE"] == "Succeeded", rows
    mid_run = []
    for row in rows:
        match = re.fullmatch(r"(\d+)/(\d+) \((\d+)%\)", row["PROGRESS"])
        if row["PHASE"] == "Training" and match and 0 < int(match.group(1)) < total:
            assert int(match.group(2)) == total, row
            assert float(row["LOSS"]) > 0, row
            assert re.fullmatch(r"\d+(s|m\d{2}s|h\d{2}m)", row["ETA"]), row
            mid_run.append(row)
    assert mid_run, f"no row showed Training with a mid-run step, a loss and an ETA: {rows}"


def trainer_pods(plane: NodeControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = kjson(plane, "get", "pods", "-n", namespace, "-l", f"visionft.io/name={name}")["items"]
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def assert_progress_by_the_trainer(plane: NodeControlPlane, namespace: str, name: str, total: int) -> None:
    """status.progress is complete and was written by the trainer pod itself (server-side apply under its
    field manager, with its ServiceAccount's in-cluster credentials)."""
    obj = kjson(plane, "get", "vft", name, "-n", namespace, "--show-managed-fields")
    progress = obj["status"]["progress"]
    assert progress["step"] == total and progress["totalSteps"] == total, progress
    managers = {
        (m["manager"], m["operation"], m.get("subresource")): m for m in obj["metadata"]["managedFields"]
    }
    trainer = managers.get((TRAINER_FIELD_MANAGER, "Apply", "status"))
    assert trainer and "f:progress" in trainer["fieldsV1"]["f:status"], list(managers)


# ------------------------------------------------------------------------------------------- the install
@pytest.fixture(scope="module")
def operator_pod(node_plane: NodeControlPlane) -> dict[str, Any]:
    """`helm install` of the chart with the local images into a `restricted` namespace; the operator's pod."""
    plane, images = node_plane, node_plane.images
    create_namespace(plane, OPERATOR_NS, RESTRICTED)
    repository, tag = images.operator.rsplit(":", 1)
    trainer_repository, trainer_tag = images.trainer.rsplit(":", 1)
    plane.helm(
        "install", RELEASE, str(CHART), "--namespace", OPERATOR_NS,
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
        "--set", f"trainer.image.repository={trainer_repository}", "--set", f"trainer.image.tag={trainer_tag}",
        "--set", "operator.resyncSeconds=5",
        "--wait", "--timeout=300s",
    )  # fmt: skip
    (pod,) = kjson(plane, "get", "pods", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR)["items"]
    return dict(pod)


def test_the_operator_runs_as_a_restricted_pod_of_its_image(
    node_plane: NodeControlPlane, operator_pod: dict
) -> None:
    plane = node_plane
    assert operator_pod["spec"]["nodeName"] == NODE_NAME
    assert operator_pod["status"]["phase"] == "Running"
    (container,) = operator_pod["status"]["containerStatuses"]
    assert container["image"] == plane.images.operator and container["ready"], container
    assert operator_pod["spec"]["serviceAccountName"] == RELEASE
    name = operator_pod["metadata"]["name"]

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        return plane.kubectl("exec", "-n", OPERATOR_NS, name, "--", *argv, check=False)

    # The container really is confined: runc applied the chart's securityContext.
    assert inside("id", "-u").stdout.strip() == "65532"
    denied = inside("python", "-c", "open('/opt/venv/probe', 'w')")
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
    assert inside("python", "-c", "open('/tmp/probe', 'w')").returncode == 0  # its emptyDir
    # Ready only once Kopf serves its health endpoint (the chart's readiness probe; `helm install --wait`
    # waited for it), so the endpoint answers now, without waiting.
    conditions = {c["type"]: c["status"] for c in operator_pod["status"]["conditions"]}
    assert conditions["Ready"] == "True", operator_pod["status"]["conditions"]
    probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status)"
    status = inside("python", "-c", probe)
    assert status.stdout.strip() == "200", status


# ------------------------------------------------------------------------------------------- quickstart
def test_quickstart_trains_in_a_real_pod_and_succeeds(
    node_plane: NodeControlPlane, operator_pod: dict
) -> None:
    plane = node_plane
    namespace = f"team-qs-{secrets.token_hex(3)}"
    create_namespace(plane, namespace, RESTRICTED)
    manifest = yaml.safe_load(QUICKSTART.read_text())
    name, total = manifest["metadata"]["name"], manifest["spec"]["training"]["maxSteps"]
    kubectl(plane, "apply", "-n", namespace, "-f", str(QUICKSTART))
    rows = watch(plane, namespace, name)
    print("kubectl get vft -o wide, each change:\n" + "\n".join(json.dumps(row) for row in rows))
    assert rows[-1]["PHASE"] == "Succeeded", diagnosis(plane, namespace, name)
    assert_trained(rows, total)
    assert_progress_by_the_trainer(plane, namespace, name, total)

    (pod,) = trainer_pods(plane, namespace, name)
    assert pod["spec"]["nodeName"] == NODE_NAME, "the CPU pod ran on a kwok node"
    (state,) = pod["status"]["containerStatuses"]
    assert state["image"] == plane.images.trainer
    assert state["state"]["terminated"]["exitCode"] == 0, state
    security = pod["spec"]["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsUser"] == 65532, security
    # The held-out exact match before and after training, as the pod reported it in the status.
    evaluation = kjson(plane, "get", "vft", name, "-n", namespace)["status"]["evaluation"]
    before, after = evaluation["base"]["value"], evaluation["final"]["value"]
    # Chance is 25% over four colours; the untrained tiny model scores about 0, the trained one about 0.99.
    assert evaluation["metric"] == "exactMatch" and after >= 0.8 and after - before >= 0.5, evaluation


# -------------------------------------------------------------------------------- S3, a kill and a resume
NAME = "shapes-s3"
# An idle machine trains the tiny model at a few steps per second: 240 steps leave a window of minutes
# between the first complete checkpoint and the end, so the kill lands inside it on a fast machine too.
MAX_STEPS = 240
CHECKPOINT_EVERY = 20


def s3_spec(bucket: str, endpoint: str) -> dict[str, Any]:
    """The recipe of the end-to-end run without a node (tiny Qwen2-VL, shapes, LoRA), as a CPU pod that
    checkpoints often enough to be killed between two checkpoints."""
    spec = vft_spec(bucket, endpoint)
    spec["training"].update(
        maxSteps=MAX_STEPS,
        gradientAccumulationSteps=1,
        checkpointEverySteps=CHECKPOINT_EVERY,
        keepCheckpoints=2,
    )
    spec["output"]["uri"] = f"s3://{bucket}/outputs/{NAME}/"
    spec["resources"] = {"gpusPerNode": 0, "cpu": "1", "memory": "3Gi", "scratchSize": "2Gi"}
    spec["runPolicy"] = {"backoffLimit": 2}
    return spec


def complete_checkpoints(s3: SeaweedS3, bucket: str) -> list[int]:
    """Steps of the checkpoints whose manifest is in the bucket (the trainer writes it last), in order."""
    prefix = f"outputs/{NAME}/checkpoints/"
    keys = "\n".join(s3.list_keys(bucket, prefix))
    return sorted(
        int(step) for step in re.findall(rf"^{re.escape(prefix)}step-(\d+)/{MANIFEST}$", keys, re.M)
    )


def test_s3_run_resumes_after_its_pod_is_killed_and_publishes(
    node_plane: NodeControlPlane, operator_pod: dict, gateway_s3: SeaweedS3, tmp_path: Path
) -> None:
    plane, s3 = node_plane, gateway_s3
    namespace = f"team-s3-{secrets.token_hex(3)}"
    create_namespace(plane, namespace, RESTRICTED)
    # The user's data and base model in S3 (a plain S3 client), and the credentials in a Secret.
    assets = tmp_path / "assets"
    run_checked([sys.executable, "-c", "import sys; from visionft.testing.tiny import save_tiny_vlm; "
                 "save_tiny_vlm('qwen2_vl', sys.argv[1], seed=0)", str(assets / "base")], timeout=300, cwd=REPO)  # fmt: skip
    run_checked([sys.executable, str(REPO / "examples" / "make_shapes_dataset.py"), str(assets / "shapes"),
                 "--train", "48", "--test", "8"], timeout=120, cwd=REPO)  # fmt: skip
    bucket = s3.create_bucket(f"vft-node-{secrets.token_hex(3)}")
    publish_inputs(
        s3, bucket, {"datasets/shapes/": assets / "shapes", "models/tiny-qwen2-vl/": assets / "base"}
    )
    kubectl(plane, "create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET_NAME, "namespace": namespace},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.credentials.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3.credentials.secret_key},
    }))  # fmt: skip
    resource = {"apiVersion": "visionft.io/v1alpha1", "kind": "VisionFineTune",
                "metadata": {"name": NAME, "namespace": namespace}, "spec": s3_spec(bucket, s3.endpoint_url)}  # fmt: skip
    kubectl(plane, "apply", "-f", "-", input=yaml.safe_dump(resource))

    # --- the first pod trains past a complete checkpoint; then its process is killed -------------------
    def step() -> int:
        obj = get_or_none(plane, "get", "vft", NAME, "-n", namespace) or {}
        return int(((obj.get("status") or {}).get("progress") or {}).get("step") or 0)

    def past_a_checkpoint() -> tuple[int, int] | None:
        done = complete_checkpoints(s3, bucket)
        current = step()
        return (done[-1], current) if done and current > done[-1] and current < MAX_STEPS - 5 else None

    checkpoint, killed_at = wait_for("a complete checkpoint in S3 and training past it", past_a_checkpoint,
                                     RUN_TIMEOUT_S, lambda: diagnosis(plane, namespace, NAME))  # fmt: skip
    (first,) = trainer_pods(plane, namespace, NAME)
    assert first["spec"]["nodeName"] == NODE_NAME and first["status"]["phase"] == "Running", first["status"]
    container_id = first["status"]["containerStatuses"][0]["containerID"]
    assert node_plane.node is not None
    node_plane.node.kill_container(container_id, signal.SIGKILL)
    rows = watch(plane, namespace, NAME)
    print(f"killed at step {killed_at}, newest complete checkpoint then {checkpoint}")
    print("kubectl get vft -o wide, each change:\n" + "\n".join(json.dumps(row) for row in rows))
    assert rows[-1]["PHASE"] == "Succeeded", diagnosis(plane, namespace, NAME)
    assert_trained(rows, MAX_STEPS)
    assert_progress_by_the_trainer(plane, namespace, NAME, MAX_STEPS)

    # --- the Job replaced the killed pod, and the new one resumed from the checkpoint ------------------
    pods = trainer_pods(plane, namespace, NAME)
    assert len(pods) == 2 and pods[0]["metadata"]["name"] == first["metadata"]["name"], pods
    killed, second = (p["status"]["containerStatuses"][0]["state"]["terminated"] for p in pods)
    assert killed["exitCode"] == 137 and second["exitCode"] == 0, (killed, second)
    status = kjson(plane, "get", "vft", NAME, "-n", namespace)["status"]
    assert status["attempts"] == 2, status
    log = plane.kubectl("logs", "-n", namespace, pods[1]["metadata"]["name"]).stdout
    resumed = RESUMED.findall(log)
    assert resumed, f"the second pod did not resume:\n{log[-3000:]}"
    uri, resumed_step = resumed[0][0], int(resumed[0][1])
    assert checkpoint <= resumed_step < MAX_STEPS and uri.endswith(f"/checkpoints/step-{resumed_step:08d}"), (
        resumed
    )

    # --- the outputs and their manifest are in the bucket ------------------------------------------------
    for pod in pods:  # the Secret reached the pods by reference only
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"] and env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    client, prefix = s3.client(), f"outputs/{NAME}/"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    listed = {f["path"]: f for f in manifest["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run.json"} <= set(listed), (
        listed
    )
    for path, entry in listed.items():
        body = client.get_object(Bucket=bucket, Key=prefix + path)["Body"].read()
        assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], path
    run = json.loads(client.get_object(Bucket=bucket, Key=prefix + "run.json")["Body"].read())
    assert run["steps"] == MAX_STEPS, run
    assert status["outputs"]["adapterUri"] == f"s3://{bucket}/{prefix}adapter/", status["outputs"]
