"""An MLflow tracking client over the server's REST API (``/api/2.0/mlflow/...``), on ``requests``.

The trainer needs six calls of the API (find or create the experiment, create or reopen a run, log a batch
of params and metrics, upload an artifact, close the run), and a client whose failures are cheap: a down
server costs one short timeout, not minutes of retries. The official ``mlflow-skinny`` client brings about
thirty packages into the training image (a web framework, cloud SDKs, OpenTelemetry) for these calls, so
this module speaks the documented REST API itself, with the client's own environment variables:

- ``MLFLOW_TRACKING_TOKEN``: a bearer token (the operator puts ``tracking.mlflow.tokenSecret`` there);
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: basic auth;
- ``MLFLOW_TRACKING_INSECURE_TLS=true`` / ``MLFLOW_TRACKING_SERVER_CERT_PATH``: TLS checking;
- ``MLFLOW_S3_ENDPOINT_URL``: the S3 endpoint of an ``s3://`` artifact root.

Artifacts go where the run's ``artifact_uri`` says: ``mlflow-artifacts:`` (a server run with
``--serve-artifacts``, the default of ``mlflow server``) through the server's artifact proxy; ``s3://``
straight to the bucket with ``visionft.storage`` (the pod's S3 credentials); any other store can't be
reached from the pod, which a ``TrackingError`` says.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import requests

#: Per request: seconds to connect and to read a reply.
TIMEOUT = (5.0, 30.0)
#: MLflow's limits for one log-batch request.
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
#: MLflow's longest parameter value (longer ones are cut, with a marker).
MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """A tracking call failed; the message says which and why, without credentials."""


class MlflowClient:
    """One MLflow server.

    Args:
        uri (str): the server's base URL (``tracking.mlflow.uri``).
        env (Mapping[str, str] | None): where the ``MLFLOW_*`` variables are read; default ``os.environ``.
        session (requests.Session | None): the HTTP session. Default: a new one.
    """

    def __init__(
        self, uri: str, env: Mapping[str, str] | None = None, session: requests.Session | None = None
    ):
        env = os.environ if env is None else env
        self.uri = uri.rstrip("/")
        self.session = session or requests.Session()
        token = env.get("MLFLOW_TRACKING_TOKEN")
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif env.get("MLFLOW_TRACKING_USERNAME"):
            self.session.auth = (env["MLFLOW_TRACKING_USERNAME"], env.get("MLFLOW_TRACKING_PASSWORD", ""))
        if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            self.session.verify = False
        elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            self.session.verify = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self.s3_endpoint = env.get("MLFLOW_S3_ENDPOINT_URL")

    # -- the REST calls ------------------------------------------------------------------------------------

    def _call(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        try:
            response = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as err:
            raise TrackingError(f"MLflow server {self.uri} unreachable ({type(err).__name__})") from None
        if response.status_code >= 400:
            raise TrackingError(_error_text(self.uri, endpoint, response))
        return response.json() if response.content else {}

    def experiment_id(self, name: str) -> str:
        """The id of the experiment ``name``, created when missing."""
        try:
            found = self._call("GET", "experiments/get-by-name", params={"experiment_name": name})
            return str(found["experiment"]["experiment_id"])
        except TrackingError as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                raise
        try:
            return str(self._call("POST", "experiments/create", json={"name": name})["experiment_id"])
        except TrackingError as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err):  # created by another run meanwhile
                raise
            found = self._call("GET", "experiments/get-by-name", params={"experiment_name": name})
            return str(found["experiment"]["experiment_id"])

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> dict[str, Any]:
        """A new run; returns its ``info`` (``run_id``, ``artifact_uri``...)."""
        body = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": _now_ms(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        return self._call("POST", "runs/create", json=body)["run"]["info"]

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run's ``info``."""
        return self._call("GET", "runs/get", params={"run_id": run_id})["run"]["info"]

    def set_status(self, run_id: str, status: str) -> None:
        """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``; a final status also sets the end time."""
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = _now_ms()
        self._call("POST", "runs/update", json=body)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [{"key": k, "value": _param_value(v)} for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._call(
                "POST",
                "runs/log-batch",
                json={"run_id": run_id, "params": items[start : start + MAX_PARAMS_PER_BATCH]},
            )

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        now = _now_ms()
        items = [{"key": k, "value": float(v), "timestamp": now, "step": step} for k, v in values.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._call(
                "POST",
                "runs/log-batch",
                json={"run_id": run_id, "metrics": items[start : start + MAX_METRICS_PER_BATCH]},
            )

    # -- artifacts -----------------------------------------------------------------------------------------

    def log_artifacts(
        self, artifact_uri: str, files: Iterable[tuple[Path, str]], storage_spec: Any = None
    ) -> None:
        """Uploads each ``(local file, path under the run's artifacts)``.

        Raises:
            TrackingError: the artifact store is neither the server's proxy nor S3, or an upload failed.
        """
        files = list(files)
        parsed = urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":
            base = parsed.path.strip("/")
            for local, name in files:
                url = f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{quote(base)}/{quote(name)}"
                with local.open("rb") as body:
                    try:
                        response = self.session.put(url, data=body, timeout=TIMEOUT)
                    except requests.RequestException as err:
                        raise TrackingError(
                            f"MLflow server {self.uri} unreachable for artifact {name} ({type(err).__name__})"
                        ) from None
                if response.status_code >= 400:
                    raise TrackingError(_error_text(self.uri, f"artifact {name}", response))
        elif parsed.scheme == "s3":
            self._upload_s3(artifact_uri.rstrip("/"), files, storage_spec)
        else:
            raise TrackingError(
                f"the run's artifact store {parsed.scheme or artifact_uri}: is not reachable from the trainer: "
                "serve artifacts through the server (mlflow server --serve-artifacts) or use an s3:// "
                "artifact root"
            )

    def _upload_s3(self, root: str, files: list[tuple[Path, str]], storage_spec: Any) -> None:
        import dataclasses

        from visionft.storage import StorageError, make_client, parse_uri, settings_from_spec

        settings = settings_from_spec(storage_spec)
        if self.s3_endpoint:
            settings = dataclasses.replace(settings, endpoint_url=self.s3_endpoint, path_style=True)
        try:
            client = make_client(settings)
            for local, name in files:
                target = parse_uri(f"{root}/{name}")
                client.upload_file(str(local), target.bucket, target.key)
        except (StorageError, OSError) as err:
            raise TrackingError(f"artifact upload to {root} failed: {err}") from None
        except Exception as err:  # botocore's own errors; their text may name the endpoint, never keys
            raise TrackingError(f"artifact upload to {root} failed ({type(err).__name__})") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 12] + "...(cut)"


def _error_text(uri: str, what: str, response: requests.Response) -> str:
    try:
        body = response.json()
        detail = f"{body.get('error_code', '')}: {body.get('message', '')}".strip(": ")
    except ValueError:
        detail = response.text[:200]
    return f"MLflow server {uri} refused {what} (HTTP {response.status_code}): {detail}"
