"""A real node beside the kwok nodes: kubelet, containerd 2.x, runc and a CNI bridge on this machine.

kwok plays the kubelets of the many fake GPU nodes; this node runs the pods that must be real: the operator
installed by its chart, the trainer's Job pods. `NodeControlPlane` is the harness's `ControlPlane` with:

- a pod network of its own (`PodNetwork`): a Linux bridge `vft<N>` with the gateway address 10.217.N.1/24
  (N picked free per plane, so several planes can run side by side). The apiserver listens on that gateway
  address, and the S3 server of a test can too (`SeaweedS3(host=...)`): services that pods need are reached
  on an address this machine owns. The apiserver's serving certificate names it.
- the `kubernetes` Service: in-cluster clients dial its ClusterIP (10.96.0.1:443, which the kubelet puts into
  KUBERNETES_SERVICE_HOST). There is no kube-proxy here (its rules are host-wide, and two planes would fight
  over them); one nftables DNAT rule, for packets that come in from this plane's bridge only, sends that
  address to the apiserver's port on the gateway. Another rule drops anything the pods would send through the
  host to other networks, and the bridge does no masquerading: pods reach this machine and nothing else.
- containerd (`RealNode`), with runc as its runtime, the CNI bridge and host-local plugins of Debian, the
  pause image made from Debian's catatonit, `restrict_oom_score_adj` (this machine kind lacks
  CAP_SYS_RESOURCE) and a content store that outlives the plane (under VISIONFT_IMAGE_CACHE, one plane at a
  time; a second concurrent plane gets a store of its own), so that the images built by
  `hack/build-images.sh` are imported only when they changed (`podman save | ctr images import`).
- a kubelet (cgroup v1 with `failCgroupV1: false`, the cgroupfs driver, its cgroups under a root of its own,
  eviction and image GC thresholds low enough for a shared disk), registered as node `real-node`, serving
  logs and exec to the apiserver with a certificate of the plane's CA.
- the fake GPU nodes tainted `nvidia.com/gpu:NoSchedule` and the apiserver's ExtendedResourceToleration
  admission on, as on GPU clusters: pods that request GPUs tolerate the taint and land on kwok's nodes,
  other pods (the operator, a CPU trainer) on the real node.

`node_unavailable()` says why a real node cannot exist on this machine (not Linux, not root, a missing
package), for tests to skip; missing binaries or images are not such a reason: they name the build
command instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from tests.harness.kube import (
    BIN_DIR,
    BUILD_SCRIPT,
    KUBERNETES_SERVICE_IP,
    REPO_ROOT,
    ControlPlane,
    ControlPlaneError,
    _Component,
    _tail,
    _wait,
    free_port,
    write_kubeconfig,
)

NODE_BINARIES = ("kubelet", "containerd", "containerd-shim-runc-v2", "ctr")
IMAGES_SCRIPT = "hack/build-images.sh"
#: What `hack/build-images.sh` writes: the image references and podman's configuration.
IMAGES_FILE = REPO_ROOT / ".cache" / "images.json"
IMAGE_CACHE = Path(
    os.environ.get("VISIONFT_IMAGE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionft"
)
RUNC = Path("/usr/sbin/runc")
CNI_BIN_DIR = Path("/usr/lib/cni")
DEBIAN_PACKAGES = (
    "podman buildah runc containernetworking-plugins mmdebstrap catatonit uidmap iptables nftables"
)
NODE_NAME = "real-node"
#: Where `hack/build-images.sh` names its images: localhost/visionft/<name>:<key of its inputs>.
IMAGE_REPOSITORY = "localhost/visionft/"
#: Where every plane's network lives: one /24 each, N in 1..250.
POD_NETWORK_PREFIX = "10.217"
#: Locks of the pod networks in use (one file per N, held while a plane runs).
LOCK_DIR = Path("/run/visionft-node")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
#: The namespace where the kubelet's CRI looks for images.
CRI_NAMESPACE = "k8s.io"
STOP_GRACE_S = 20.0


def node_unavailable() -> str | None:
    """Why a real node cannot run on this machine, or None when it can (binaries and images aside)."""
    if not Path("/proc/self/mountinfo").exists() or os.uname().sysname != "Linux":
        return "a real node needs Linux"
    if os.geteuid() != 0:
        return "a real node needs root (containerd, runc, network namespaces, cgroups)"
    missing = [
        str(p)
        for p in (RUNC, CNI_BIN_DIR / "bridge", CNI_BIN_DIR / "host-local")
        if not os.access(p, os.X_OK)
    ]
    missing += [tool for tool in ("ip", "nft", "podman") if shutil.which(tool) is None]
    if missing:
        return f"a real node needs {', '.join(missing)}: apt-get install -y {DEBIAN_PACKAGES}"
    return None


def missing_node_binaries(bin_dir: Path = BIN_DIR) -> list[str]:
    return [name for name in NODE_BINARIES if not os.access(bin_dir / name, os.X_OK)]


def _run(
    argv: Sequence[str | Path], *, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, timeout=600, **kwargs
    )
    if check and result.returncode != 0:
        raise ControlPlaneError(
            f"{' '.join(map(str, argv[:4]))} failed ({result.returncode}): {result.stderr}"
        )
    return result


# ---------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class Images:
    """The images that `hack/build-images.sh` built, and how to reach podman's storage that holds them."""

    operator: str
    trainer: str
    pause: str
    containers_conf: str
    storage_conf: str

    @classmethod
    def load(cls, path: Path = IMAGES_FILE) -> Images:
        """Read the references the build wrote.

        Raises:
            FileNotFoundError: when the images were never built, naming the script that builds them.
        """
        if not path.exists():
            raise FileNotFoundError(
                f"no {path}: build the images with `{IMAGES_SCRIPT}` (README command 1 runs it)"
            )
        data = json.loads(path.read_text())
        return cls(
            **{k: data[k] for k in ("operator", "trainer", "pause", "containers_conf", "storage_conf")}
        )

    def podman_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": self.containers_conf,
            "CONTAINERS_STORAGE_CONF": self.storage_conf,
        }

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["podman", *args], check=check, env=self.podman_env())

    def missing(self) -> list[str]:
        """References that podman's storage does not hold (the build's output was removed or is stale)."""
        return [ref for ref in (self.operator, self.trainer, self.pause)
                if self.podman("image", "exists", ref, check=False).returncode != 0]  # fmt: skip


# --------------------------------------------------------------------------------------------- network
class PodNetwork:
    """One plane's bridge, subnet and nftables table; `index` is N in 10.217.N.0/24 and `vft<N>`."""

    def __init__(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = None
        for index in range(1, 251):
            handle = (LOCK_DIR / f"net-{index}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self._lock, self.index = handle, index
            break
        else:
            raise ControlPlaneError(f"all 250 pod networks in {LOCK_DIR} are in use")
        self.bridge = f"vft{self.index}"
        self.subnet = f"{POD_NETWORK_PREFIX}.{self.index}.0/24"
        self.gateway = f"{POD_NETWORK_PREFIX}.{self.index}.1"
        self.table = f"visionft-{self.index}"

    def create(self) -> None:
        """The bridge with the gateway address, up; leftovers of a plane that died with this index go first."""
        self.delete()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def route_service(self, service_ip: str, service_port: int, target_port: int) -> None:
        """Pods' connections to `service_ip:service_port` go to the gateway's `target_port`; nothing from the
        bridge is forwarded anywhere else."""
        rules = textwrap.dedent(f"""\
            table ip {self.table} {{
              chain prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                iifname "{self.bridge}" ip daddr {service_ip} tcp dport {service_port} dnat to {self.gateway}:{target_port}
              }}
              chain forward {{
                type filter hook forward priority filter; policy accept;
                iifname "{self.bridge}" drop
                oifname "{self.bridge}" drop
              }}
            }}
            """)  # fmt: skip
        _run(["nft", "-f", "-"], input=rules)

    def cni_config(self, ipam_dir: Path) -> dict[str, Any]:
        """The CNI network: Debian's bridge and host-local plugins, a default route via the gateway."""
        first = f"{POD_NETWORK_PREFIX}.{self.index}.10"
        return {
            "cniVersion": "1.0.0",
            "name": self.table,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # The gateway address is already on the bridge; isGateway would also turn on IP
                    # forwarding for the whole host, which pods here never need.
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet, "rangeStart": first, "gateway": self.gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(ipam_dir),
                    },
                }
            ],
        }

    def delete(self) -> None:
        _run(["nft", "delete", "table", "ip", self.table], check=False)
        _run(["ip", "link", "delete", self.bridge], check=False)

    def release(self) -> None:
        self.delete()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


# ------------------------------------------------------------------------------------------------ node
def _cgroup_v1_roots() -> list[Path]:
    """The cgroup v1 hierarchies' mount points (cpu, memory, pids, ...), from /proc/self/mountinfo."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup":
            roots.append(Path(fields[0].split()[4]))
    return roots


def _own_cgroup(controller: str = "memory") -> str:
    """This process's cgroup path in one v1 hierarchy ("/" at the top)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points under any of `roots`, deepest first."""
    prefixes = [str(r.resolve()) for r in roots]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            points.append(point)
    return sorted(points, key=len, reverse=True)


class RealNode:
    """containerd and a kubelet on this machine, registered with `plane` as node `real-node`.

    Args:
        plane (NodeControlPlane): the control plane whose apiserver the kubelet registers with.
        network (PodNetwork): the plane's pod network.
        images (Images): the images to make available to the kubelet (imported into containerd as needed).
    """

    def __init__(self, plane: NodeControlPlane, network: PodNetwork, images: Images) -> None:
        self.plane = plane
        self.network = network
        self.images = images
        self.dir = plane.work_dir / "node"
        self.state = Path(f"/run/visionft-node/state-{network.index}")
        # The kubelet's sockets live under its root dir and a socket path holds at most 107 bytes: a short
        # root of its own, on disk (the pods' emptyDir volumes are in it), whatever the plane's folder is.
        self.kubelet_root = Path(f"/var/lib/visionft-node/kubelet-{network.index}")
        self.socket = self.state / "containerd.sock"
        self.cgroup_root = f"{_own_cgroup().rstrip('/')}/visionft-node-{network.index}"
        self.kubelet_port = free_port()
        self.components: dict[str, _Component] = {}
        self.import_seconds: dict[str, float] = {}
        self._store_lock: IO[str] | None = None
        self.content_root = self._content_root()

    def _content_root(self) -> Path:
        """The shared, lasting content store when no other plane holds it, else one of this plane's own."""
        shared = IMAGE_CACHE / "containerd"
        shared.mkdir(parents=True, exist_ok=True)
        handle = (shared / ".lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return self.dir / "containerd-root"
        self._store_lock = handle
        return shared / "root"

    # -- configuration ------------------------------------------------------------------------------
    def _containerd_config(self) -> Path:
        cni_dir = self.dir / "cni"
        (cni_dir / "net.d").mkdir(parents=True, exist_ok=True)
        (cni_dir / "net.d" / "10-visionft.conflist").write_text(
            json.dumps(self.network.cni_config(cni_dir / "ipam"), indent=2)
        )
        config = f"""\
            version = 3
            root = "{self.content_root}"
            state = "{self.state}"
            disabled_plugins = [
              "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
              "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
              "io.containerd.snapshotter.v1.erofs", "io.containerd.tracing.processor.v1.otlp",
              "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri",
            ]

            [grpc]
              address = "{self.socket}"

            [ttrpc]
              address = "{self.state}/containerd.sock.ttrpc"

            [debug]
              address = ""

            [metrics]
              address = ""

            [plugins.'io.containerd.cri.v1.images']
              snapshotter = "overlayfs"
              [plugins.'io.containerd.cri.v1.images'.pinned_images]
                sandbox = "{self.images.pause}"

            [plugins.'io.containerd.cri.v1.runtime']
              enable_selinux = false
              # No CAP_SYS_RESOURCE here: runc can't lower oom_score_adj below the runtime's own.
              restrict_oom_score_adj = true
              netns_mounts_under_state_dir = true
              [plugins.'io.containerd.cri.v1.runtime'.containerd]
                default_runtime_name = "runc"
                [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
                  runtime_type = "io.containerd.runc.v2"
                  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
                    BinaryName = "{RUNC}"
                    SystemdCgroup = false
              [plugins.'io.containerd.cri.v1.runtime'.cni]
                bin_dirs = ["{CNI_BIN_DIR}"]
                conf_dir = "{cni_dir / "net.d"}"
                max_conf_num = 1

            [plugins.'io.containerd.grpc.v1.cri']
              stream_server_address = "127.0.0.1"
              stream_server_port = "{free_port()}"
            """
        path = self.dir / "containerd.toml"
        path.write_text(textwrap.dedent(config))
        return path

    def _kubelet_config(self) -> Path:
        pki = self.plane.pki
        crt, key = pki.issue("kubelet-serving", NODE_NAME, server_names=[f"IP:{self.network.gateway}"])
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine kind has cgroup v1 (hybrid) hierarchies and no systemd.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": self.network.gateway,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "tlsCertFile": str(crt),
            "tlsPrivateKeyFile": str(key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(self.dir / "pod-logs"),
            "failSwapOn": False,
            # A disk shared with other work: evict only when it is nearly full, and never collect images
            # (the pods use local images only).
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 32,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf",
            "clusterDomain": "cluster.local",
            "shutdownGracePeriod": "0s",
            # No host-wide iptables chains (KUBE-FIREWALL, canaries): nothing here uses them.
            "makeIPTablesUtilChains": False,
        }
        path = self.dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _kubelet_kubeconfig(self) -> Path:
        crt, key = self.plane.pki.issue("kubelet", f"system:node:{NODE_NAME}", ["system:nodes"])
        return write_kubeconfig(self.dir / "kubelet.kubeconfig", self.plane.server, self.plane.pki.ca_crt,
                                user=f"system:node:{NODE_NAME}", cert=crt, key=key)  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------------------
    def _component(self, name: str, argv: list[str]) -> _Component:
        component = _Component(name, argv, self.plane.log_dir / f"{name}.log")
        self.components[name] = component
        return component

    def start(self, timeout: float = 120.0) -> None:
        """containerd, the images it lacks, the kubelet; returns once the node is Ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_state()  # a plane that died with this network index
        self.state.mkdir(parents=True, exist_ok=True)
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self._make_cgroup_root()
        path = f"{self.plane.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        os.environ["PATH"] = path  # containerd finds its shim on PATH
        containerd = self._component(
            "containerd", [str(self.plane.bin_dir / "containerd"), "--config", str(self._containerd_config())]
        )
        containerd.start()
        _wait("containerd's socket", lambda: self.ctr("version").returncode == 0, 60, containerd.running)
        for name, ref in (("pause", self.images.pause), ("operator", self.images.operator),
                          ("trainer", self.images.trainer)):  # fmt: skip
            self._ensure_image(name, ref)
        self._drop_stale_images()
        kubelet = self._component(
            "kubelet",
            [
                str(self.plane.bin_dir / "kubelet"),
                f"--config={self._kubelet_config()}",
                f"--kubeconfig={self._kubelet_kubeconfig()}",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.network.gateway}",
                "--node-labels=visionft.io/node=real",
                "--v=1",
            ],
        )
        kubelet.start()
        _wait(f"node {NODE_NAME} Ready (kubelet)", lambda: self.plane.node_ready(NODE_NAME), timeout,
              kubelet.running)  # fmt: skip

    def ctr(self, *args: str, input_file: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(self.plane.bin_dir / "ctr"), f"--address={self.socket}", "-n", CRI_NAMESPACE, *args]
        if input_file is None:
            return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        return subprocess.run(
            argv, stdin=input_file, capture_output=True, text=True, check=False, timeout=1800
        )

    def kill_container(self, container_id: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to a container's main process (a pod's `containerd://<id>` or the bare id), as a crash
        or the OOM killer would: the kubelet sees the container exit and reports it."""
        result = self.ctr("tasks", "kill", "-s", sig.name, container_id.removeprefix("containerd://"))
        if result.returncode != 0:
            raise ControlPlaneError(f"ctr tasks kill {container_id}: {result.stderr}")

    def _ensure_image(self, name: str, ref: str) -> None:
        """Import `ref` from podman's storage unless containerd has it (its tag is a key of its inputs)."""
        listed = self.ctr("images", "ls", "-q", f"name=={ref}")
        if listed.returncode == 0 and ref in listed.stdout.split():
            return
        began = time.monotonic()
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.images.podman_env())  # fmt: skip
        assert save.stdout is not None
        imported = self.ctr(
            "images", "import", "--local", "--discard-unpacked-layers", "-", input_file=save.stdout
        )
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace") if save.stderr else ""
        if save.wait() != 0 or imported.returncode != 0:
            raise ControlPlaneError(f"importing {ref} into containerd failed: {save_err}{imported.stderr}")
        self.import_seconds[name] = time.monotonic() - began

    def _drop_stale_images(self) -> None:
        """Remove earlier builds from the lasting store, so that it holds one build of each image, as
        podman's storage does: our older tags and the CRI's `sha256:<id>` names of images no tag names
        (containerd then collects their layers)."""
        current = {self.images.pause, self.images.operator, self.images.trainer}
        listed = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:]]
        keep = {row[2] for row in listed if len(row) > 2 and row[0] in current}
        for row in listed:
            ref, digest = row[0], row[2] if len(row) > 2 else ""
            if ref not in current and digest not in keep and ref.startswith((IMAGE_REPOSITORY, "sha256:")):
                self.ctr("images", "rm", "--sync", ref)

    def _make_cgroup_root(self) -> None:
        for root in _cgroup_v1_roots():
            (root / self.cgroup_root.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def _remove_cgroups(self) -> None:
        for root in _cgroup_v1_roots():
            top = root / self.cgroup_root.lstrip("/")
            if not top.exists():
                continue
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):  # fmt: skip
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def stop(self) -> None:
        """Stop the kubelet, every container of the node, containerd and its shims; unmount and remove what
        the node made (the content store stays)."""
        if "kubelet" in self.components:
            self.components["kubelet"].stop(grace=2.0)  # its state is thrown away: no need to drain
        if "containerd" in self.components and self.components["containerd"].running():
            self._remove_containers()
        if "containerd" in self.components:
            self.components["containerd"].stop(grace=STOP_GRACE_S)
        self._kill_shims()
        self._remove_state()
        self._remove_cgroups()
        if self._store_lock is not None:
            self._store_lock.close()
            self._store_lock = None

    def _remove_state(self) -> None:
        """Unmount and remove the node's run-time state and the kubelet's root (the content store stays)."""
        for point in _mounts_under(self.dir, self.state, self.kubelet_root):
            _run(["umount", "-l", point], check=False)
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.kubelet_root, ignore_errors=True)

    def _remove_containers(self) -> None:
        tasks = self.ctr("tasks", "ls", "-q").stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task)
        deadline = time.monotonic() + 10
        for task in tasks:
            while self.ctr("tasks", "delete", task).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", container)
        # The CRI's leases of its sandboxes and containers would keep their snapshots, and with them
        # every image they ran, in the lasting store.
        for lease in self.ctr("leases", "ls", "-q").stdout.split():
            self.ctr("leases", "rm", lease)

    def _kill_shims(self) -> None:
        """The runc shims outlive containerd by design; end those of this node's containerd (by pid)."""
        marker = str(self.socket)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if (
                    argv
                    and argv[0].endswith(b"containerd-shim-runc-v2")
                    and marker.encode() in b" ".join(argv)
                ):
                    os.kill(int(proc.name), signal.SIGKILL)

    def log_tails(self, lines: int) -> str:
        return "\n".join(
            f"----- {c.name} ({c.log}) -----\n{_tail(c.log, lines)}" for c in self.components.values()
        )


# ------------------------------------------------------------------------------------------------ plane
class NodeControlPlane(ControlPlane):
    """The harness's control plane with a real node beside the kwok GPU nodes (see the module docstring).

    Args:
        images (Images | None): the images to run; read from `.cache/images.json` when None.
        **kwargs: as `ControlPlane` (`host` and `gpu_node_taints` are set here).
    """

    def __init__(self, images: Images | None = None, **kwargs: Any) -> None:
        self.images = images or Images.load()
        self.network = PodNetwork()
        kwargs.setdefault("gpu_node_taints", [GPU_TAINT])
        super().__init__(host=self.network.gateway, **kwargs)
        self.node: RealNode | None = None

    @property
    def pki(self) -> Any:
        assert self._pki is not None, "start() first"
        return self._pki

    def start(self) -> Any:
        """The bridge, the control plane on its gateway, then the node; see `ControlPlane.start`."""
        missing = missing_node_binaries(self.bin_dir)
        if missing:
            self.network.release()
            raise FileNotFoundError(
                f"the real node needs {', '.join(missing)} in {self.bin_dir}; build them with `{BUILD_SCRIPT}`"
            )
        began = time.monotonic()
        self.network.create()
        try:
            report = super().start()
        except BaseException:
            self.network.release()
            raise
        try:
            self.network.route_service(KUBERNETES_SERVICE_IP, 443, self.apiserver_port)
            self.node = RealNode(self, self.network, self.images)
            self.node.start()
        except BaseException as exc:
            self._fail_start(exc)
        report.steps["real node"] = time.monotonic() - began - report.total
        for name, seconds in self.node.import_seconds.items():
            report.steps[f"import {name}"] = seconds
        report.total = time.monotonic() - began
        return report

    def stop(self, *, keep_files: bool = False) -> None:
        if self.node is not None:
            self.node.stop()
        super().stop(keep_files=keep_files)
        self.network.release()

    def log_tails(self, lines: int = 40) -> str:
        tails = super().log_tails(lines)
        return tails + ("\n" + self.node.log_tails(lines) if self.node is not None else "")

    def _argv(self, name: str) -> list[str]:
        argv = super()._argv(name)
        if name == "kube-apiserver":
            crt, key = self.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                      ["system:masters"])  # fmt: skip
            argv += [
                f"--kubelet-client-certificate={crt}",
                f"--kubelet-client-key={key}",
                f"--kubelet-certificate-authority={self.pki.ca_crt}",
                "--kubelet-preferred-address-types=InternalIP",
                # GPU pods tolerate the GPU nodes' taint by themselves, as on GPU clusters.
                "--enable-admission-plugins=ExtendedResourceToleration",
            ]
        return argv
