"""`scripts/dev-cluster.sh`: the local plane of the tests as a cluster to try VisionFT on, on this machine.

It starts what the end-to-end tests run on (tests/harness/node.py): etcd, kube-apiserver, controller
manager, scheduler, kwok with fake GPU nodes, a real node (kubelet, containerd, runc) for the pods that must
run, and an S3 server (SeaweedFS) on the pod network's gateway; writes an admin kubeconfig; prints how to
install the chart with the locally built images and run the examples; and stops everything on Ctrl-C (or
SIGTERM). With `--install` it also runs that `helm install`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.harness.kube import BIN_DIR, REPO_ROOT
from tests.harness.node import GPU_TAINT, NODE_NAME, Images, NodeControlPlane, node_unavailable
from tests.harness.s3 import SeaweedS3

DEFAULT_DIR = REPO_ROOT / ".cache" / "dev-cluster"
RELEASE, NAMESPACE, TENANT, SECRET = "visionft", "visionft-system", "team-a", "dev-s3"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


def _namespace(plane: NodeControlPlane, name: str, labels: dict[str, str]) -> None:
    plane.kubectl("create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    ))  # fmt: skip


def helm_install_args(images: Images) -> list[str]:
    """`helm install` of the chart with the local images, which the node has and never pulls."""
    repository, tag = images.operator.rsplit(":", 1)
    trainer_repository, trainer_tag = images.trainer.rsplit(":", 1)
    return [
        "install", RELEASE, str(REPO_ROOT / "charts" / "visionft"), "--namespace", NAMESPACE,
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
        "--set", f"trainer.image.repository={trainer_repository}", "--set", f"trainer.image.tag={trainer_tag}",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/dev-cluster.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-nodes", type=int, default=2, help="fake 8-GPU nodes (kwok); default 2")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state folder; default {DEFAULT_DIR}")
    parser.add_argument(
        "--install", action="store_true", help="also helm install the chart with the local images"
    )
    args = parser.parse_args(argv)

    reason = node_unavailable()
    if reason:
        print(f"dev-cluster: {reason}", file=sys.stderr)
        return 2
    try:
        images = Images.load()
    except FileNotFoundError as exc:
        print(f"dev-cluster: {exc}", file=sys.stderr)
        return 2
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    plane = NodeControlPlane(images=images, gpu_nodes=args.gpu_nodes, work_dir=args.dir / "plane")
    s3: SeaweedS3 | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        report = plane.start()
        s3 = SeaweedS3(data_dir=args.dir / "s3", host=plane.network.gateway)
        s3.start()
        kubeconfig = args.dir / "kubeconfig"
        shutil.copy(plane.kubeconfig, kubeconfig)
        _namespace(plane, NAMESPACE, RESTRICTED)
        _namespace(plane, TENANT, RESTRICTED)
        plane.kubectl("create", "secret", "generic", SECRET, "-n", TENANT,
                      f"--from-literal=AWS_ACCESS_KEY_ID={s3.credentials.access_key}",
                      f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.credentials.secret_key}")  # fmt: skip
        install = helm_install_args(images)
        if args.install:
            plane.helm(*install, "--wait", "--timeout=300s")
        print(_summary(plane, s3, images, kubeconfig, install, report, installed=args.install), flush=True)
        stop.wait()
    finally:
        print("\nstopping the dev cluster", file=sys.stderr)
        if s3 is not None:
            s3.stop()
        plane.stop(keep_files=True)
    return 0


def _summary(plane: NodeControlPlane, s3: SeaweedS3, images: Images, kubeconfig: Path, install: list[str],
             report: Any, *, installed: bool) -> str:  # fmt: skip
    helm = BIN_DIR / "helm"
    kubectl = Path(sys.executable).parent / "kubectl"
    quoted = " ".join(a if a.isprintable() and " " not in a else repr(a) for a in install)
    lines = [
        f"dev cluster up in {report.total:.0f} s: apiserver {plane.server}, node {NODE_NAME} (real: kubelet, "
        f"containerd, runc; pods on {plane.network.subnet}), {plane.gpu_nodes} kwok GPU nodes (taint "
        f"{GPU_TAINT['key']}:{GPU_TAINT['effect']}, tolerated by pods that request GPUs)",
        "",
        f"  export KUBECONFIG={kubeconfig}",
        f"  export PATH={kubectl.parent}:{helm.parent}:$PATH      # kubectl, helm",
        "",
        "the chart is installed, with:" if installed else "install the chart with the local images:",
        f"  helm {quoted}",
        f"then, in namespace {TENANT} (Pod Security restricted, with Secret {SECRET} for the S3 server):",
        f"  kubectl apply -n {TENANT} -f examples/quickstart.yaml",
        f"  kubectl get vft -n {TENANT} -w",
        "",
        f"S3 server for the pods and for you: {s3.endpoint_url} (path-style), credentials in Secret {TENANT}/{SECRET};",
        "  set storage.endpoint to it and storage.credentialsSecret to the Secret in a VisionFineTune.",
        f"images: {images.operator}, {images.trainer}",
        f"logs: {plane.log_dir}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
