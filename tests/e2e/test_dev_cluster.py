"""`scripts/dev-cluster.sh` as a user runs it: a local cluster with the real node, the chart installed.

The script is started as README shows (`--install`), in a folder of the test's own. The test waits for its
summary, then uses only what the summary prints (the kubeconfig, the S3 endpoint, the Secret's name): the
nodes are the real one and the kwok GPU nodes, the operator runs on the real node, the examples are accepted
by the apiserver (server-side dry run), the S3 server takes a bucket with the Secret's credentials. SIGTERM
stops everything: the script exits 0 and the pod network's bridge is gone.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tests.harness.node import GPU_TAINT, NODE_NAME, Images

pytestmark = [pytest.mark.node, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "Ctrl-C stops everything."
#: The start includes importing changed images into containerd (several GB), on a loaded 2-core machine.
START_TIMEOUT_S = 1200
GPU_NODES = 1


class Script:
    """`scripts/dev-cluster.sh ARGS` in its own process group, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "dev-cluster.sh"), *args], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.lines:
            if self.process.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.5)  # the reader's last lines
                pytest.fail(f"dev-cluster.sh never printed {text!r}:\n{self.output()[-6000:]}", pytrace=False)
            time.sleep(0.5)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def test_dev_cluster_starts_the_local_plane_with_the_chart_and_stops_clean(
    built_images: Images, tmp_path: Path
) -> None:
    script = Script("--install", "--gpu-nodes", str(GPU_NODES), "--dir", str(tmp_path / "dev"))
    try:
        script.wait_for_line(READY_LINE, START_TIMEOUT_S)
        summary = script.output()
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", summary)
        endpoint = re.search(r"S3 server for the pods and for you: (http://\S+) ", summary)
        secret = re.search(r"credentials in Secret ([\w-]+)/([\w-]+)", summary)
        subnet = re.search(r"pods on (10\.\d+\.(\d+)\.0/24)", summary)
        assert kubeconfig and endpoint and secret and subnet, summary

        def kubectl(*args: str) -> str:
            result = subprocess.run(
                [str(Path(sys.executable).parent / "kubectl"), f"--kubeconfig={kubeconfig.group(1)}", *args],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
            return result.stdout

        nodes = {n["metadata"]["name"]: n for n in json.loads(kubectl("get", "nodes", "-o", "json"))["items"]}
        real = nodes.pop(NODE_NAME)
        assert {c["type"]: c["status"] for c in real["status"]["conditions"]}["Ready"] == "True"
        assert len(nodes) == GPU_NODES, list(nodes)
        for node in nodes.values():
            assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) == 8, node["status"]
            assert GPU_TAINT["key"] in {t["key"] for t in node["spec"].get("taints", [])}, node["spec"]

        pods = json.loads(kubectl("get", "pods", "-n", "visionft-system", "-o", "json"))["items"]
        assert [(p["spec"]["nodeName"], p["status"]["phase"]) for p in pods] == [(NODE_NAME, "Running")], pods
        assert pods[0]["status"]["containerStatuses"][0]["image"] == built_images.operator

        namespace, name = secret.groups()
        applied = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(REPO / "examples"))
        examples = sorted(path.stem for path in (REPO / "examples").glob("*.yaml"))
        accepted = re.findall(
            r"^visionfinetune\.visionft\.io/(\S+) created \(server dry run\)$", applied, re.M
        )
        assert "quickstart" in examples and len(accepted) == len(examples), applied

        data = json.loads(kubectl("get", "secret", name, "-n", namespace, "-o", "json"))["data"]
        s3 = boto3.client(
            "s3", endpoint_url=endpoint.group(1), region_name="us-east-1",
            aws_access_key_id=base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode(),
            aws_secret_access_key=base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode(),
            config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip
        s3.create_bucket(Bucket="dev-cluster-test")
        assert "dev-cluster-test" in [b["Name"] for b in s3.list_buckets()["Buckets"]]

        script.process.send_signal(signal.SIGTERM)
        assert script.process.wait(timeout=120) == 0, script.output()[-3000:]
    finally:
        script.kill()
    bridge = subprocess.run(["ip", "link", "show", f"vft{subnet.group(2)}"], capture_output=True, check=False)
    assert bridge.returncode != 0, "the pod network's bridge outlived the dev cluster"
