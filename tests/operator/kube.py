"""kubectl-based helpers for the operator's cluster tests: every call goes through the real apiserver of
the test control plane (tests/harness), as a user would make it. Kubelet-side pod state that kwok does not
simulate (a container's exit code, a missing Secret) is written to the pod's status subresource, exactly as
the kubelet reports it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from visionft_operator.names import label_value

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "visionft.io_visionfinetunes.yaml"
T = TypeVar("T")


def kubectl_binary() -> str:
    candidate = Path(sys.executable).parent / "kubectl"
    return str(candidate) if candidate.exists() else "kubectl"


class Kube:
    """kubectl against one kubeconfig."""

    def __init__(self, kubeconfig: str | Path) -> None:
        self.kubeconfig = str(kubeconfig)

    def run(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        as_user: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [kubectl_binary(), "--kubeconfig", self.kubeconfig, *args]
        if as_user:
            cmd.append(f"--as={as_user}")
        result = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[3:])} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def apply(
        self,
        obj: dict[str, Any] | list[dict[str, Any]],
        *extra: str,
        check: bool = True,
        as_user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        docs = obj if isinstance(obj, list) else [obj]
        return self.run(
            "apply", "-f", "-", *extra, stdin=yaml.safe_dump_all(docs), check=check, as_user=as_user
        )

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        result = self.run(*args, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.run(*args).stdout)["items"]

    def patch(
        self, kind: str, name: str, namespace: str, patch: dict[str, Any], *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps(patch), *extra, check=check
        )

    def delete(self, kind: str, name: str, namespace: str, *extra: str) -> None:
        self.run("delete", kind, name, "-n", namespace, "--ignore-not-found", "--wait=false", *extra)

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        )
        # The ServiceAccount admission plugin needs the namespace's default ServiceAccount.
        wait_for(
            lambda: self.get("serviceaccount", "default", name), timeout=30, what=f"default SA in {name}"
        )
        return name

    # --- the resource ------------------------------------------------------------------------------

    def vft(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self.get("visionfinetunes.visionft.io", name, namespace)

    def phase(self, name: str, namespace: str) -> str | None:
        obj = self.vft(name, namespace)
        return ((obj or {}).get("status") or {}).get("phase")

    def wait_phase(self, name: str, namespace: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.vft(name, namespace)
            return obj if ((obj or {}).get("status") or {}).get("phase") in phases else None

        try:
            return wait_for(check, timeout=timeout, what=f"{namespace}/{name} in {phases}")
        except TimeoutError as err:
            obj = self.vft(name, namespace)
            raise TimeoutError(f"{err}; status: {json.dumps((obj or {}).get('status'), indent=1)}") from None

    def report_progress(
        self, name: str, namespace: str, progress: dict[str, Any], service_account: str
    ) -> None:
        """What the trainer does: server-side apply of status.progress as the trainer's ServiceAccount,
        stamped with the time of the report unless it has one."""
        stamped = {"updateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **progress}
        body = {
            "apiVersion": "visionft.io/v1alpha1",
            "kind": "VisionFineTune",
            "metadata": {"name": name, "namespace": namespace},
            "status": {"progress": stamped},
        }
        self.run(
            "apply",
            "--server-side",
            "--field-manager=visionft-trainer",
            "--force-conflicts",
            "--subresource=status",
            "-f",
            "-",
            stdin=yaml.safe_dump(body),
            as_user=f"system:serviceaccount:{namespace}:{service_account}",
        )

    def started_ago(self, name: str, namespace: str, seconds: int) -> None:
        """Make the run look as if it first started ``seconds`` ago: status.startTime moved back (a status
        write as the cluster admin), so that its deadline can run out without waiting for it. Waits until
        the operator has set startTime, which it never moves once set."""
        wait_for(
            lambda: ((self.vft(name, namespace) or {}).get("status") or {}).get("startTime"),
            timeout=30,
            what=f"status.startTime of {namespace}/{name}",
        )
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))
        self.patch("vft", name, namespace, {"status": {"startTime": started}}, "--subresource=status")

    # --- pods ------------------------------------------------------------------------------------------

    def pods(self, name: str, namespace: str) -> list[dict[str, Any]]:
        return self.list("pods", namespace, f"visionft.io/name={label_value(name)}")

    def wait_pod(
        self,
        name: str,
        namespace: str,
        phase: str = "Running",
        timeout: float = 60,
        exclude: set[str] | None = None,
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for pod in self.pods(name, namespace):
                if pod["metadata"]["name"] in (exclude or set()) or pod["metadata"].get("deletionTimestamp"):
                    continue
                if (pod.get("status") or {}).get("phase") == phase:
                    return pod
            return None

        return wait_for(check, timeout=timeout, what=f"a {phase} pod of {namespace}/{name}")

    def terminate_pod(
        self,
        pod: dict[str, Any],
        exit_code: int = 0,
        reason: str = "Completed",
        message: str = "",
        disrupted: bool = False,
    ) -> None:
        """The kubelet's report of a finished container; ``disrupted`` adds the DisruptionTarget condition
        that preemption, eviction or node loss sets."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = pod["spec"]["containers"][0]
        conditions = [
            {"type": "Ready", "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"}
        ]
        if disrupted:
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "lastTransitionTime": now,
                    "reason": "PreemptionByScheduler",
                    "message": "preempted by a higher-priority pod",
                }
            )
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": reason,
                            "message": message,
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
        self.patch(
            "pod",
            pod["metadata"]["name"],
            pod["metadata"]["namespace"],
            {"status": status},
            "--subresource=status",
        )

    def container_waiting(self, pod: dict[str, Any], reason: str, message: str) -> None:
        """The kubelet's report of a container that can't start (e.g. CreateContainerConfigError)."""
        container = pod["spec"]["containers"][0]
        status = {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
            ],
        }
        self.patch(
            "pod",
            pod["metadata"]["name"],
            pod["metadata"]["namespace"],
            {"status": status},
            "--subresource=status",
        )

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.list("events", namespace)
        return [
            e
            for e in items
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == "VisionFineTune"
        ]


def wait_for(
    check: Callable[[], T | None], timeout: float = 60, interval: float = 0.3, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """The real ``visionft-operator`` console script as a subprocess, scoped to some namespaces."""

    def __init__(
        self,
        kubeconfig: str,
        namespaces: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log_path
        self.extra_env = env or {}
        self.args = ["--standalone"] if args is None else args
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "VISIONFT_RESYNC_SECONDS": "1",
            "VISIONFT_METRICS_PORT": str(self.metrics_port),
            "VISIONFT_LIVENESS_PORT": str(self.liveness_port),
            "VISIONFT_TRAINER_IMAGE": "ghcr.io/visionft/trainer:test",
            "VISIONFT_LOG_LEVEL": "DEBUG",
            # kwok finishes a running pod after 1 s unless told otherwise: the tests end pods themselves,
            # as the kubelet would report them (Kube.terminate_pod).
            "VISIONFT_POD_ANNOTATIONS": '{"visionft.io/kwok-duration": "1h"}',
            **self.extra_env,
        }
        script = Path(sys.executable).parent / "visionft-operator"
        args = [str(script)] if script.exists() else [sys.executable, "-m", "visionft_operator.main"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*args, *self.args], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._live, timeout=60, what="the operator's liveness endpoint")
        return self

    def _live(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the operator exited with {self.proc.returncode}; log:\n{self.logs()[-4000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.liveness_port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
