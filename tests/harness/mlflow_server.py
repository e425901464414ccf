"""A real MLflow tracking server for the tests: `mlflow server` from its wheel, on loopback.

The server lives in a venv of its own (`hack/install-mlflow-server.sh`, which README command 1 runs and
`ensure_installed` runs again when the venv is missing): its wheel pins pyarrow below the project's pin.
The backend store is a SQLite file in a temporary folder; artifacts go to the real S3 server
(tests/harness/s3.py) through the server's artifact proxy (`--artifacts-destination s3://...`), the set-up
a cluster's MLflow usually has.

Tests read a run back with MLflow's own client, in the server's venv (`read_run`, running
`tests/harness/mlflow_read.py`), so that what the trainer wrote is checked by the reference client and not
by the trainer's own REST code.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.s3 import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VISIONFT_MLFLOW_VENV", REPO / ".cache" / "mlflow-server"))
READER = Path(__file__).with_name("mlflow_read.py")
#: Seconds to wait for /health after the process starts: a bound, not an expectation (on a shared 2-core
#: machine the server's imports alone took 90 s, and its start then went past 120 s).
START_TIMEOUT_S = 300.0


def ensure_installed() -> Path:
    """The server venv's `mlflow` executable, installing the venv first when needed."""
    subprocess.run(["bash", str(REPO / "hack" / "install-mlflow-server.sh")], check=True, timeout=1200)
    return VENV / "bin" / "mlflow"


class MlflowServer:
    """One `mlflow server` process.

    Args:
        artifacts_destination (str): where the server keeps artifacts, e.g. `s3://bucket/mlflow`.
        env (dict[str, str]): extra environment for the server (the S3 credentials and endpoint).
    """

    def __init__(self, artifacts_destination: str, env: dict[str, str]):
        self.mlflow = ensure_installed()
        self.root = Path(tempfile.mkdtemp(prefix="visionft-mlflow-"))
        self.port = free_port()
        self.artifacts_destination = artifacts_destination
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self) -> float:
        """Starts the server and waits for /health; returns the seconds it took."""
        t0 = time.monotonic()
        env = {**os.environ, **self.env, "MLFLOW_S3_ENDPOINT_URL": self.env["AWS_ENDPOINT_URL_S3"]}
        env.pop("PYTHONPATH", None)  # the server's venv only
        command = [
            str(self.mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {START_TIMEOUT_S:.0f} s: {self._tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def read_run(self, experiment: str, run_name: str, download_to: Path) -> dict[str, Any]:
        """The run `run_name` of `experiment`, as MLflow's client reads it: info, params, every metric's
        history, the artifact listing (recursive), and the artifacts downloaded into `download_to`."""
        env = {**os.environ, **self.env, "MLFLOW_S3_ENDPOINT_URL": self.env["AWS_ENDPOINT_URL_S3"]}
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            [str(VENV / "bin" / "python"), str(READER), self.uri, experiment, run_name, str(download_to)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"reading the run back failed: {result.stderr[-3000:]}")
        return json.loads(result.stdout)
