"""End to end, with real components only: a VisionFineTune from manifest to outputs, and the secret-leak test.

What runs, and what stands in for what:

- the control plane: etcd, kube-apiserver (with an audit log), controller manager, scheduler, and kwok
  playing the kubelet of a fake GPU node (tests/harness/kube.py, tests/e2e/conftest.py);
- S3: a SeaweedFS server whose only identity has planted, unique credentials (tests/harness/s3.py);
- the operator: the real `visionft-operator` console script as a subprocess, scoped to the tenant's
  namespace, authenticated with a token of its own ServiceAccount and holding exactly the RBAC that the Helm
  chart (charts/visionft) grants in namespaced mode, so that it could not read a Secret if it tried;
- the user: `kubectl` as a cluster admin creates the namespace (Pod Security "restricted"), publishes a
  generated image dataset (examples/make_shapes_dataset.py) and a tiny random-weight Qwen2-VL-family base
  model (visionft.testing.tiny.save_tiny_vlm) to S3 with a plain S3 client, creates the Secret, and applies
  a VisionFineTune;
- the training pod's container: the real `visionft-train` CLI as a local process. The test acts as the
  kubelet for it: it takes the command and environment from the pod the Job controller made, resolves
  `valueFrom.secretKeyRef` by reading the Secret itself (the operator never does), writes the ConfigMap
  volume's files and makes the emptyDir volumes in a temporary root (mount paths are mapped into it, in
  the command, the environment and the mounted config, as a chroot would), and materializes the projected
  ServiceAccount volume (a TokenRequest token of the pod's ServiceAccount, ca.crt, namespace), which the
  trainer reads through a kubeconfig naming those files, since the in-cluster loader looks for them at
  fixed absolute paths. kwok keeps the pod Running meanwhile (the operator's VISIONFT_POD_ANNOTATIONS puts
  kwok's duration annotation on the pod); when the process exits, the test reports the container's real
  exit code in the pod's status, as the kubelet does, and the Job controller completes the Job.

What it proves: the trainer reads its dataset and base model from S3 with the Secret's credentials,
trains, pushes progress into status.progress through the apiserver under its own identity (the audit log
shows its ServiceAccount's status patches, all allowed), checkpoints and uploads its outputs; the
operator drives the resource through Training to Succeeded with status.outputs naming the published
prefix, whose manifest is complete; `kubectl get vft -o wide` shows phase, progress, a numeric loss and
an ETA while it trains. And no planted credential (nor its base64) appears in the operator's log, the
trainer's output, any Event, the resource, any ConfigMap, Job, pod or other object of the namespace, the
saved outputs in S3 or the trainer's local files, while the operator's and the trainer's identities never
made a request on Secrets (neither may: `kubectl auth can-i`), the training pod passed Pod Security
"restricted" admission, and the chart's RBAC refused the operator nothing.

Its limits: the local process is not confined as the container would be (read-only root filesystem,
UID 65532, the resource limits), so those settings are checked by the operator's own tests, not here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.e2e.conftest import AuditedControlPlane
from tests.harness.kube import BIN_DIR, ControlPlane, free_port
from tests.harness.s3 import S3Credentials, SeaweedS3

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CRD = REPO / "crds" / "visionft.io_visionfinetunes.yaml"
CHART = REPO / "charts" / "visionft"
NAME = "shapes-colour"
SECRET_NAME = "team-s3"
#: Enough steps that training outlasts the trainer's status throttle (visionft.job.reporting.StatusReporter:
#: one write per 5 s, the first spent at train begin) even on an idle machine, where a step of the tiny
#: model takes 0.07-0.09 s (about 11 s in all); on a loaded 2-core machine a step took up to 1.8 s.
MAX_STEPS = 128
LORA_R = 8
TRAINER_TIMEOUT_S = 360
TRAINER_FIELD_MANAGER = "visionft-trainer"
MANIFEST = "_visionft_manifest.json"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- helpers
def wait_for(what: str, probe: Callable[[], T | None], timeout: float, detail: Callable[[], str] = str) -> T:
    """Poll `probe` until it returns something truthy; on time-out fail with `detail()`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}", pytrace=False)
        time.sleep(0.5)


def kubectl(plane: ControlPlane, *args: str, input: str | None = None) -> str:
    return plane.kubectl(*args, input=input).stdout


def kjson(plane: ControlPlane, *args: str) -> Any:
    return json.loads(kubectl(plane, *args, "-o", "json"))


def get_or_none(plane: ControlPlane, *args: str) -> dict[str, Any] | None:
    result = plane.kubectl(*args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of kubectl's table output, cut at the header's column starts (cells may hold spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    columns = [(m.group(0), m.start()) for m in re.finditer(r"\S+", lines[0])]
    rows = []
    for line in lines[1:]:
        row = {}
        for index, (name, start) in enumerate(columns):
            end = columns[index + 1][1] if index + 1 < len(columns) else None
            row[name] = line[start:end].strip()
        rows.append(row)
    return rows


def leak_needles(credentials: S3Credentials) -> dict[str, bytes]:
    """Each planted value, and its base64 forms at the three byte alignments it could have inside a larger
    base64-encoded blob (the stable middle of each encoding; a Secret's `data` is the first form)."""
    needles: dict[str, bytes] = {}
    for label, value in (("access key", credentials.access_key), ("secret key", credentials.secret_key)):
        raw = value.encode()
        needles[label] = raw
        for shift in range(3):
            encoded = base64.b64encode(b"\0" * shift + raw)
            core = encoded if shift == 0 else encoded[4:-4]
            needles[f"{label} (base64, offset {shift})"] = core
    return needles


def find_leaks(where: str, data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [f"{label} in {where}" for label, needle in needles.items() if needle in data]


def run_checked(argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(argv[:3])} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    )
    return result


# ----------------------------------------------------------------------------------- the stand-in kubelet
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def pod_field(pod: dict[str, Any], path: str) -> str:
    """A downward-API field of the pod (fieldRef), as the kubelet fills it."""
    simple = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": (pod.get("status") or {}).get("podIP", ""),
        "status.hostIP": (pod.get("status") or {}).get("hostIP", ""),
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
    raise AssertionError(f"the stand-in kubelet does not know fieldRef {path}")


class LocalPodRoot:
    """The pod's filesystem view for a local process: each volume mount becomes a folder under `root`.

    ConfigMap volumes get their keys as files, emptyDirs an empty folder, and the projected
    ServiceAccount volume its token (TokenRequest for the pod's ServiceAccount, with the projection's
    expiry and audience), ca.crt and namespace, all read-only. Any path that starts with a mount path (in
    the command, the environment or a mounted JSON file) is mapped to the mount's folder, as a chroot
    would see it. Other volume types fail loudly: they would need a decision (a Secret volume, notably,
    would put credentials on disk).
    """

    def __init__(
        self, plane: AuditedControlPlane, pod: dict[str, Any], container: dict[str, Any], root: Path
    ):
        self.root = root
        self.mounts: dict[str, Path] = {}
        self.service_account_dir: Path | None = None
        namespace = pod["metadata"]["namespace"]
        config_files: list[tuple[Path, str]] = []  # paths inside these are mapped (JSON)
        other_files: list[tuple[Path, str]] = []

        def config_map_files(local: Path, ref: dict[str, Any]) -> list[tuple[Path, str]]:
            data = kjson(plane, "get", "configmap", ref["name"], "-n", namespace)["data"]
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            return [(local / item["path"], data[item["key"]]) for item in items]

        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            local = root / "volumes" / mount["name"] / mount.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                config_files += config_map_files(local, volume["configMap"])
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "serviceAccountToken" in source:
                        token = source["serviceAccountToken"]
                        args = ["create", "token", pod["spec"]["serviceAccountName"], "-n", namespace]
                        args.append(f"--duration={token.get('expirationSeconds', 3600)}s")
                        if token.get("audience"):
                            args.append(f"--audience={token['audience']}")
                        other_files.append((local / token["path"], kubectl(plane, *args).strip()))
                        self.service_account_dir = local
                    elif "configMap" in source:
                        other_files += config_map_files(local, source["configMap"])
                    elif "downwardAPI" in source:
                        other_files += [
                            (local / item["path"], pod_field(pod, item["fieldRef"]["fieldPath"]))
                            for item in source["downwardAPI"]["items"]
                        ]
                    else:
                        raise AssertionError(f"the stand-in kubelet does not know projection {source}")
            elif "emptyDir" not in volume:
                raise AssertionError(f"the stand-in kubelet does not know the volume type of {volume}")
            self.mounts[mount["mountPath"].rstrip("/")] = local
        # Once every mount is known: paths inside mounted JSON files are mapped too; then read-only.
        for path, text in config_files:
            with contextlib.suppress(ValueError):  # a file that is not JSON stays as it is
                text = json.dumps(self._map_json(json.loads(text)), indent=2)
            other_files.append((path, text))
        for path, text in other_files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o444)

    def in_cluster_kubeconfig(self, server: str) -> Path:
        """A kubeconfig made of exactly what `load_incluster_config` reads (the projected token file and
        ca.crt): the in-cluster client reads them from fixed absolute paths, so a local process needs this
        one indirection."""
        assert self.service_account_dir is not None, "the pod has no projected ServiceAccount token"
        path = self.root / "in-cluster.kubeconfig"
        user = {"tokenFile": str(self.service_account_dir / "token")}
        cluster = {"server": server, "certificate-authority": str(self.service_account_dir / "ca.crt")}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "pod", "cluster": cluster}],
            "users": [{"name": "pod", "user": user}],
            "contexts": [{"name": "pod", "context": {"cluster": "pod", "user": "pod"}}],
        }))  # fmt: skip
        return path

    def map_path(self, value: str) -> str:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(self.mounts[mount]) + value[len(mount) :]
        return value

    def _map_json(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self._map_json(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._map_json(v) for v in node]
        return self.map_path(node) if isinstance(node, str) else node


def resolve_env(
    plane: AuditedControlPlane, pod: dict[str, Any], container: dict[str, Any], fs: LocalPodRoot
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order; `$(VAR)`
    expanded from earlier entries; Secret and ConfigMap keys read from the API (by the test, as the
    kubelet, with its own identity); fieldRefs from the pod. Path values are mapped into the local root."""
    namespace = pod["metadata"]["namespace"]
    cache: dict[tuple[str, str], dict[str, str]] = {}

    def data_of(kind: str, name: str) -> dict[str, str]:
        if (kind, name) not in cache:
            obj = kjson(plane, "get", kind, name, "-n", namespace)
            raw = obj.get("data") or {}
            cache[kind, name] = (
                {k: base64.b64decode(v).decode() for k, v in raw.items()} if kind == "secret" else dict(raw)
            )
        return cache[kind, name]

    env: dict[str, str] = {"HOSTNAME": pod["metadata"]["name"]}  # the kubelet always sets it
    for source in container.get("envFrom", []):
        kind, ref = (
            ("secret", source["secretRef"])
            if "secretRef" in source
            else ("configmap", source["configMapRef"])
        )
        for key, value in data_of(kind, ref["name"]).items():
            env[source.get("prefix", "") + key] = value
    for item in container.get("env", []):
        if "valueFrom" not in item:
            value = re.sub(
                r"\$\$|\$\((\w+)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                item.get("value", ""),
            )
            env[item["name"]] = fs.map_path(value)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = data_of("secret", ref["name"])[ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = data_of("configmap", ref["name"])[ref["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = pod_field(pod, source["fieldRef"]["fieldPath"])
        else:
            raise AssertionError(f"the stand-in kubelet does not know env source {item}")
    return env


# ---------------------------------------------------------------------------------------------- set-up
def install_crd(plane: AuditedControlPlane) -> None:
    kubectl(plane, "apply", "--server-side", "-f", str(CRD))
    wait_for(
        "the VisionFineTune CRD to be Established and served",
        lambda: plane.kubectl(
            "get", "crd", "visionfinetunes.visionft.io", "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False,
        ).stdout.strip() == "True"
        and plane.kubectl("get", "vft", "-A", check=False).returncode == 0,
        timeout=60,
    )  # fmt: skip


def create_namespace(plane: ControlPlane, name: str, labels: dict[str, str]) -> None:
    kubectl(plane, "create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    ))  # fmt: skip
    wait_for(
        f"the default ServiceAccount of {name}",
        lambda: get_or_none(plane, "get", "serviceaccount", "default", "-n", name),
        timeout=30,
    )


def install_operator_rbac(plane: AuditedControlPlane, release: str, operator_ns: str, tenant_ns: str) -> str:
    """Apply the chart's ServiceAccount and RBAC (namespaced mode, watching `tenant_ns`); return the SA."""
    helm = BIN_DIR / "helm"
    assert os.access(helm, os.X_OK), f"helm is not built in {BIN_DIR}; run hack/build-test-cluster.sh"
    rendered = run_checked(
        [
            str(helm), "template", release, str(CHART), "--namespace", operator_ns,
            "--set", f"operator.watchNamespaces={{{tenant_ns}}}",
            "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
        ],
        timeout=60,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"], kinds
    kubectl(plane, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")


def publish_inputs(s3: SeaweedS3, bucket: str, folders: dict[str, Path]) -> None:
    """Upload local folders as a user would (`aws s3 cp --recursive`): no VisionFT code, no manifest."""
    client = s3.client()
    for prefix, folder in folders.items():
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        assert files, f"nothing to publish in {folder}"
        for path in files:
            client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def _source_path() -> dict[str, str]:
    """The test session's PYTHONPATH, when it has one: the sources under test (a second checkout whose
    venv's editable install points at another one) are the ones the operator and the trainer run."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": path} if path else {}


class Operator:
    """The real `visionft-operator` process, logging to a file."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, home: Path):
        self.liveness_port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "KUBECONFIG": str(kubeconfig),
            "VISIONFT_LIVENESS_PORT": str(self.liveness_port),
            "VISIONFT_METRICS_PORT": str(free_port()),
            "VISIONFT_TRAINER_IMAGE": "ghcr.io/visionft/trainer:e2e",
            "VISIONFT_LOG_LEVEL": "DEBUG",  # the most the operator ever writes: the most a leak could hide in
            "VISIONFT_RESYNC_SECONDS": "5",
            # kwok ends a running pod after 1 s unless annotated: hold it Running until the test, as the
            # kubelet, reports the local process's exit.
            "VISIONFT_POD_ANNOTATIONS": json.dumps({"visionft.io/kwok-duration": "1h"}),
            **_source_path(),
        }
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "visionft-operator"), "--namespace", namespace, "--standalone"],
            env=env, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def wait_live(self, timeout: float = 60) -> None:
        def live() -> bool:
            if self.process.poll() is not None:
                pytest.fail(
                    f"the operator exited with {self.process.returncode}:\n{self.tail()}", pytrace=False
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", live, timeout, self.tail)

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._out.close()


def vft_spec(bucket: str, endpoint: str) -> dict[str, Any]:
    return {
        "model": {"uri": f"s3://{bucket}/models/tiny-qwen2-vl/", "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": LORA_R, "alpha": LORA_R},
        "dataset": {
            "uri": f"s3://{bucket}/datasets/shapes/",
            "format": "imagefolder",
            "maxImagePixels": 3136,
        },
        "training": {
            "maxSteps": MAX_STEPS,
            "perDeviceBatchSize": 4,
            "gradientAccumulationSteps": 2,
            "learningRate": 5e-3,
            "warmupSteps": 1,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 32,
            "keepCheckpoints": 1,
            "loggingSteps": 1,
            "optimizations": False,
        },
        "evaluation": {
            "samples": 4,
            "metrics": ["exactMatch", "cer"],
            "everySteps": MAX_STEPS // 2,
            "generation": {"maxNewTokens": 4},
        },
        "output": {"uri": f"s3://{bucket}/outputs/{NAME}/", "saveMethod": "lora"},
        "storage": {"endpoint": endpoint, "addressingStyle": "path", "credentialsSecret": SECRET_NAME},
        "resources": {"gpusPerNode": 1, "cpu": "1", "memory": "2Gi", "scratchSize": "2Gi"},
    }


def files_under(*roots: Path) -> Iterable[Path]:
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield path


# -------------------------------------------------------------------------------------------------- test
def test_trainer_runs_as_the_pod_and_no_credential_leaks(
    audited_control_plane: AuditedControlPlane,
    planted_s3: SeaweedS3,
    planted_credentials: S3Credentials,
    tmp_path: Path,
) -> None:
    plane, s3, creds = audited_control_plane, planted_s3, planted_credentials
    began = time.monotonic()
    timings: dict[str, float] = {}
    suffix = secrets.token_hex(3)
    tenant, operator_ns, release = f"team-e2e-{suffix}", f"visionft-system-{suffix}", f"vft{suffix}"

    # The base model is built in the background while the cluster side is set up.
    assets = tmp_path / "assets"
    model_log = tmp_path / "tiny-model.log"
    with model_log.open("wb") as log:
        model_build = subprocess.Popen(
            [sys.executable, "-c", "import sys; from visionft.testing.tiny import save_tiny_vlm; "
             "save_tiny_vlm('qwen2_vl', sys.argv[1], seed=0)", str(assets / "base")],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    run_checked(
        [sys.executable, str(REPO / "examples" / "make_shapes_dataset.py"), str(assets / "shapes"),
         "--train", "48", "--test", "8"],
        timeout=120, cwd=REPO,
    )  # fmt: skip

    # --- the cluster side: CRD, namespaces, the operator's chart identity, the user's Secret ------------
    install_crd(plane)
    create_namespace(plane, operator_ns, {})
    create_namespace(
        plane,
        tenant,
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
    )
    operator_sa = install_operator_rbac(plane, release, operator_ns, tenant)
    operator_user = f"system:serviceaccount:{operator_ns}:{operator_sa}"
    # The operator's ServiceAccount cannot read Secrets (while it can do its job: the control).
    for verb in ("get", "list", "watch"):
        answer = plane.kubectl(
            "auth", "can-i", verb, "secrets", "-n", tenant, f"--as={operator_user}", check=False
        )
        assert answer.stdout.strip() == "no", (
            f"the operator may {verb} Secrets: {answer.stdout}{answer.stderr}"
        )
    answer = plane.kubectl(
        "auth", "can-i", "create", "jobs.batch", "-n", tenant, f"--as={operator_user}", check=False
    )
    assert answer.stdout.strip() == "yes", answer.stdout + answer.stderr
    operator_identity = plane.as_service_account(operator_ns, operator_sa, create=False)

    # The user's Secret (created, not applied: no last-applied annotation with a second copy).
    kubectl(plane, "create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET_NAME, "namespace": tenant},
        "stringData": {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key},
    }))  # fmt: skip

    # --- the user's data and base model in S3 -------------------------------------------------------------
    assert model_build.wait(timeout=300) == 0, model_log.read_text(errors="replace")[-3000:]
    bucket = s3.create_bucket(f"vft-e2e-{suffix}")
    publish_inputs(
        s3, bucket, {"datasets/shapes/": assets / "shapes", "models/tiny-qwen2-vl/": assets / "base"}
    )
    timings["set-up"] = time.monotonic() - began

    # --- the operator, then the resource ----------------------------------------------------------------
    operator = Operator(
        operator_identity.kubeconfig, tenant, tmp_path / "operator.log", tmp_path / "operator-home"
    )
    trainer_process: subprocess.Popen[bytes] | None = None
    pod_root = tmp_path / "pod"
    trainer_out, trainer_err = tmp_path / "trainer.stdout", tmp_path / "trainer.stderr"
    table: list[dict[str, str]] = []
    try:
        operator.wait_live()
        resource = {
            "apiVersion": "visionft.io/v1alpha1",
            "kind": "VisionFineTune",
            "metadata": {"name": NAME, "namespace": tenant},
            "spec": vft_spec(bucket, s3.endpoint_url),
        }
        kubectl(plane, "apply", "-f", "-", input=yaml.safe_dump(resource))

        def job_events() -> str:
            events = kjson(plane, "get", "events", "-n", tenant)["items"]
            return "\n".join(f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: "
                             f"{e.get('message', '')}" for e in events)  # fmt: skip

        def running_pod() -> dict[str, Any] | None:
            pods = kjson(plane, "get", "pods", "-n", tenant, "-l", f"visionft.io/name={NAME}")["items"]
            return next((p for p in pods if (p.get("status") or {}).get("phase") == "Running"), None)

        def diagnosis() -> str:
            obj = get_or_none(plane, "get", "vft", NAME, "-n", tenant) or {}
            return (f"status: {json.dumps(obj.get('status'), indent=1)}\nevents:\n{job_events()}\n"
                    f"operator log tail:\n{operator.tail()}")  # fmt: skip

        job = wait_for(
            "the operator's Job",
            lambda: get_or_none(plane, "get", "job", f"{NAME}-trainer", "-n", tenant),
            60,
            diagnosis,
        )
        pod = wait_for("the training pod Running (kwok)", running_pod, 60, diagnosis)
        timings["operator to running pod"] = time.monotonic() - began - timings["set-up"]

        # The Job and the pod reference the Secret; they do not carry its values.
        for obj in (job["spec"]["template"], pod):
            env = {e["name"]: e for e in obj["spec"]["containers"][0].get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[var], f"{var} is inlined in the pod spec"
                assert env[var]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": var}, env[var]

        # --- the stand-in kubelet runs the container ------------------------------------------------------
        container = pod["spec"]["containers"][0]
        fs = LocalPodRoot(plane, pod, container, pod_root)
        env = resolve_env(plane, pod, container, fs)
        # The kubelet resolved the secretKeyRef (the values reach only this process's environment).
        assert env["AWS_SECRET_ACCESS_KEY"] == creds.secret_key
        trainer_user = f"system:serviceaccount:{tenant}:{pod['spec']['serviceAccountName']}"
        answer = plane.kubectl(
            "auth", "can-i", "get", "secrets", "-n", tenant, f"--as={trainer_user}", check=False
        )
        assert answer.stdout.strip() == "no", f"the trainer may read Secrets: {answer.stdout}{answer.stderr}"
        # The projected token and CA, through a kubeconfig (see LocalPodRoot.in_cluster_kubeconfig).
        env["KUBECONFIG"] = str(fs.in_cluster_kubeconfig(plane.server))
        env.setdefault("PATH", f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin")  # the image's PATH
        env.update(_source_path())
        argv = [fs.map_path(part) for part in [*container.get("command", []), *container.get("args", [])]]
        executable = shutil.which(argv[0], path=env["PATH"])
        assert executable, f"{argv[0]} is not on the image's PATH stand-in {env['PATH']}"
        workdir = Path(fs.map_path(container.get("workingDir", str(pod_root))))
        workdir.mkdir(parents=True, exist_ok=True)
        with trainer_out.open("wb") as out, trainer_err.open("wb") as err:
            trainer_process = subprocess.Popen(
                [executable, *argv[1:]], env=env, cwd=workdir, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        started = time.monotonic()

        # --- `kubectl get vft -o wide` while it trains ------------------------------------------------------
        def poll_table() -> dict[str, str]:
            rows = parse_table(kubectl(plane, "get", "vft", NAME, "-n", tenant, "-o", "wide"))
            assert len(rows) == 1, rows
            row = {k: v for k, v in rows[0].items() if k != "AGE"}
            if not table or row != table[-1]:
                table.append(row)
            return rows[0]

        while trainer_process.poll() is None:
            if time.monotonic() - started > TRAINER_TIMEOUT_S:
                os.killpg(trainer_process.pid, signal.SIGKILL)
                trainer_process.wait()
                pytest.fail(f"the trainer ran over {TRAINER_TIMEOUT_S} s:\n{trainer_err.read_text()[-4000:]}")
            poll_table()
            time.sleep(1.0)
        code = trainer_process.returncode
        timings["trainer process"] = time.monotonic() - started
        assert code == 0, (
            f"visionft-train exited {code}:\n{trainer_err.read_text(errors='replace')[-6000:]}\n"
            f"stdout tail:\n{trainer_out.read_text(errors='replace')[-2000:]}"
        )

        # The kubelet reports the container's exit; the Job controller completes the Job.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        kubectl(plane, "patch", "pod", pod["metadata"]["name"], "-n", tenant, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": {
                    "phase": "Succeeded",
                    "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted",
                                    "lastTransitionTime": now}],
                    "containerStatuses": [{
                        "name": container["name"], "image": container["image"], "imageID": "",
                        "ready": False, "started": False, "restartCount": 0,
                        "state": {"terminated": {"exitCode": code, "reason": "Completed",
                                                 "startedAt": now, "finishedAt": now}},
                    }],
                }}))  # fmt: skip
        wait_for("phase Succeeded", lambda: poll_table()["PHASE"] == "Succeeded", 60, diagnosis)
    finally:
        if trainer_process is not None and trainer_process.poll() is None:
            os.killpg(trainer_process.pid, signal.SIGKILL)
            trainer_process.wait()
        operator.stop()
        print(f"\noperator log: {operator.log}\ntrainer output: {trainer_out}, {trainer_err}")
        print("kubectl get vft -o wide, each change:\n" + "\n".join(json.dumps(row) for row in table))

    # --- kubectl showed progress and a numeric loss along the way ---------------------------------------
    phases = [row["PHASE"] for row in table]
    assert "Training" in phases and phases[-1] == "Succeeded", phases
    training = []
    for row in table:
        match = re.fullmatch(r"(\d+)/(\d+) \((\d+)%\)", row["PROGRESS"])
        if row["PHASE"] == "Training" and match and 0 < int(match.group(1)) < MAX_STEPS:
            assert int(match.group(2)) == MAX_STEPS, row
            loss = float(row["LOSS"])  # a number, or this raises
            assert loss > 0, row
            assert re.fullmatch(r"\d+(s|m\d{2}s|h\d{2}m)", row["ETA"]), row
            training.append(row)
    assert training, (
        f"no row showed Training with a mid-run step, a loss and an ETA (the trainer ran "
        f"{timings['trainer process']:.1f} s; it writes status.progress at most once per 5 s): {table}"
    )

    # --- the resource's status: Succeeded, the trainer's progress, the outputs ----------------------------
    obj = kjson(plane, "get", "vft", NAME, "-n", tenant, "--show-managed-fields")
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == MAX_STEPS and status["progress"]["totalSteps"] == MAX_STEPS, status
    assert isinstance(status["progress"]["loss"], float) and status["progress"]["loss"] > 0, status
    output = f"s3://{bucket}/outputs/{NAME}/"
    assert status["outputs"]["adapterUri"] == f"{output}adapter/", status["outputs"]
    # status.progress was written by server-side apply under the trainer's field manager.
    managers = {
        (m["manager"], m["operation"], m.get("subresource")): m for m in obj["metadata"]["managedFields"]
    }
    trainer_fields = managers.get((TRAINER_FIELD_MANAGER, "Apply", "status"))
    assert trainer_fields and "f:progress" in trainer_fields["fieldsV1"]["f:status"], list(managers)

    # --- the evaluation: in the status (the trainer's field manager), the EVAL column, the operator's Event
    # for the best step and its Degraded condition ------------------------------------------------------------
    evaluation = status["evaluation"]
    assert evaluation["metric"] == "exactMatch" and evaluation["samples"] == 4, evaluation
    assert evaluation["base"]["step"] == 0 and evaluation["final"]["step"] == MAX_STEPS, evaluation
    assert "f:evaluation" in trainer_fields["fieldsV1"]["f:status"]
    assert table[-1]["EVAL"] == evaluation["summary"] and table[-1]["EVAL"].startswith("exactMatch "), table
    best = evaluation["best"]["step"]
    assert status["announcedBestStep"] == best
    events = kjson(plane, "get", "events", "-n", tenant)["items"]
    announced = [
        e
        for e in events
        if e["reason"] == "NewBestMetric" and e["involvedObject"]["kind"] == "VisionFineTune"
    ]
    assert any(f"at step {best}" in e["message"] for e in announced), [e["message"] for e in announced]
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert degraded["reason"] in {"WorseThanBase", "NotWorseThanBase"}, degraded
    assert (degraded["status"] == "True") == evaluation["worseThanBase"], (degraded, evaluation)

    # --- the published outputs: a complete manifest, the adapter files listed and present ---------------
    client = s3.client()
    prefix = f"outputs/{NAME}/"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    listed = {f["path"]: f for f in manifest["files"]}
    assert manifest["file_count"] == len(listed) and manifest["total_bytes"] == sum(
        f["size"] for f in listed.values()
    )
    expected = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run.json"}
    expected |= {"metrics.json", "gallery.html", "loss.png"}
    assert expected <= set(listed), listed
    downloaded: dict[str, bytes] = {}
    for key in s3.list_keys(bucket, prefix):
        downloaded[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    for path, entry in listed.items():
        body = downloaded.get(prefix + path)
        assert body is not None, f"the manifest lists {path}, which is not in S3"
        assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], path
    adapter_keys = [k for k in downloaded if k.startswith(prefix + "adapter/")]
    assert adapter_keys and all(k.removeprefix(prefix) in listed for k in adapter_keys), adapter_keys
    assert json.loads(downloaded[prefix + "adapter/adapter_config.json"])["r"] == LORA_R
    assert json.loads(downloaded[prefix + "run.json"])["steps"] == MAX_STEPS
    checkpoint_prefix = status["outputs"]["checkpointUri"].removeprefix(f"s3://{bucket}/")
    assert any(k.startswith(checkpoint_prefix) for k in downloaded), "no checkpoint was uploaded"

    # --- the apiserver's record: who touched Secrets, and the trainer's own status writes ----------------
    audit = plane.audit_events()
    on_secrets = [e for e in audit if (e.get("objectRef") or {}).get("resource") == "secrets"]
    readers = {e["user"]["username"] for e in on_secrets if e["objectRef"].get("namespace") == tenant}
    assert "visionft-admin" in readers, readers  # the stand-in kubelet's read: proof the audit records them
    assert operator_user not in readers and trainer_user not in readers, readers
    by_trainer = [e for e in audit if e["user"]["username"] == trainer_user]
    status_patches = [
        e for e in by_trainer
        if e["verb"] == "patch" and e.get("objectRef", {}).get("resource") == "visionfinetunes"
        and e["objectRef"].get("subresource") == "status" and e["objectRef"].get("name") == NAME
        and e["responseStatus"]["code"] == 200
    ]  # fmt: skip
    trainer_requests = [(e["verb"], e.get("objectRef"), e["responseStatus"]) for e in by_trainer]
    assert len(status_patches) >= 3, trainer_requests
    refused = [r for r in trainer_requests if r[2]["code"] >= 400]
    assert not refused, refused
    by_operator = [e for e in audit if e["user"]["username"] == operator_user]
    assert by_operator, "the operator's requests are not audited"
    # The chart's RBAC is enough: nothing the operator asked for was refused.
    forbidden = [
        (e["verb"], e.get("objectRef"), e.get("requestURI"))
        for e in by_operator
        if e["responseStatus"]["code"] == 403
    ]
    assert not forbidden, forbidden

    # --- the planted credentials appear nowhere ------------------------------------------------------------
    needles = leak_needles(creds)
    secret_json = kubectl(plane, "get", "secret", SECRET_NAME, "-n", tenant, "-o", "json").encode()
    # The control: the search finds the values where they are meant to be (the Secret's data is base64).
    assert find_leaks("the Secret", secret_json, needles), (
        "the leak search does not find the Secret's own data"
    )
    # What is searched covers the run: the operator logged about the resource, the trainer printed its
    # progress, and the operator posted Events on the resource.
    operator_log = operator.log.read_bytes()
    assert NAME.encode() in operator_log, "the operator's log does not mention the resource"
    assert trainer_out.read_bytes().count(b'"event": "progress"') >= 1, "the trainer printed no progress"
    leaks: list[str] = []
    leaks += find_leaks("the operator's log", operator_log, needles)
    leaks += find_leaks("the trainer's stdout", trainer_out.read_bytes(), needles)
    leaks += find_leaks("the trainer's stderr", trainer_err.read_bytes(), needles)
    leaks += find_leaks("kubectl get vft -o wide", json.dumps(table).encode(), needles)
    kinds = ",".join((
        "events", "events.events.k8s.io", "configmaps", "jobs", "pods", "serviceaccounts", "roles",
        "rolebindings", "services", "visionfinetunes",
    ))  # fmt: skip
    namespace_objects = kjson(plane, "get", kinds, "-n", tenant)["items"]
    assert {"Event", "ConfigMap", "Job", "Pod", "VisionFineTune"} <= {o["kind"] for o in namespace_objects}
    operator_events = [
        o for o in namespace_objects
        if o["kind"] == "Event" and (o.get("involvedObject") or o.get("regarding") or {}).get("name") == NAME
    ]  # fmt: skip
    assert operator_events, "no Event on the resource"
    for item in namespace_objects:
        leaks += find_leaks(f"{item['kind']} {item['metadata']['name']}", json.dumps(item).encode(), needles)
    for key, body in downloaded.items():
        leaks += find_leaks(f"s3://{bucket}/{key}", body, needles)
    local_files = list(files_under(pod_root))
    assert any(p.name == "adapter_model.safetensors" for p in local_files), (
        "the trainer's local output is missing"
    )
    for path in local_files:
        leaks += find_leaks(str(path.relative_to(tmp_path)), path.read_bytes(), needles)
    assert not leaks, leaks

    timings["total"] = time.monotonic() - began
    print(
        f"searched: operator log {len(operator_log)} B, trainer output {trainer_out.stat().st_size} + "
        f"{trainer_err.stat().st_size} B, {len(namespace_objects)} namespace objects "
        f"({len(operator_events)} Events on the resource), {len(downloaded)} S3 objects, "
        f"{len(local_files)} local files; audit: {len(status_patches)} status patches by the trainer"
    )
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
