"""Experiment tracking: the run's parameters, losses, metrics and reports, sent to MLflow and/or written as
TensorBoard event files (``tracking`` in the recipe).

``Tracking`` fans each call out to its sinks and keeps tracking from ever stopping training: a sink that
fails to start (a server that is down, a refused token) is dropped with one warning, and a later failure is
warned about once per sink, then logged at debug level. Metric names are the same everywhere:
``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``eval/loss`` and ``eval/<metric>``.

A run keeps its MLflow run across restarts: ``state()`` (the MLflow run id) is written into every
checkpoint folder as ``tracking.json``, and a run resumed from that checkpoint reopens the same MLflow run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from visionft_api.evaluation import TrackingSettings

logger = logging.getLogger(__name__)

#: The file in each checkpoint folder that names the tracking runs to resume.
STATE_FILE = "tracking.json"


class Sink(Protocol):
    """One tracking destination; ``local`` ones write files into the output folder."""

    name: str
    local: bool

    def start(self, params: Mapping[str, Any], resume: Mapping[str, Any]) -> None: ...
    def log_metrics(self, values: Mapping[str, float], step: int) -> None: ...
    def log_artifacts(self, files: list[tuple[Path, str]]) -> None: ...
    def finish(self, status: str) -> None: ...
    def state(self) -> dict[str, Any]: ...


class MlflowSink:
    """An MLflow run (``visionft.tracking.mlflow``).

    Args:
        settings: ``tracking.mlflow`` (``visionft_api.evaluation.MlflowTracking``).
        run_name (str): the run's name when ``settings.run_name`` is unset.
        tags (Mapping[str, str]): tags of a new run.
        storage_spec: the recipe's ``storage``, for an ``s3://`` artifact root.
    """

    name = "MLflow"
    local = False

    def __init__(self, settings: Any, run_name: str, tags: Mapping[str, str], storage_spec: Any = None):
        from visionft.tracking.mlflow import MlflowClient

        self.settings = settings
        self.client = MlflowClient(settings.uri)
        self.run_name = settings.run_name or run_name
        self.tags = dict(tags)
        self.storage_spec = storage_spec
        self.run_id: str | None = None
        self.artifact_uri: str | None = None

    def start(self, params: Mapping[str, Any], resume: Mapping[str, Any]) -> None:
        previous = resume.get("mlflowRunId")
        if previous:
            info = self.client.get_run(str(previous))
            self.run_id, self.artifact_uri = info["run_id"], info["artifact_uri"]
            self.client.set_status(self.run_id, "RUNNING")
            logger.info("MLflow run %s resumed on %s", self.run_id, self.client.uri)
            return
        experiment = self.client.experiment_id(self.settings.experiment)
        info = self.client.create_run(experiment, self.run_name, self.tags)
        self.run_id, self.artifact_uri = info["run_id"], info["artifact_uri"]
        self.client.log_params(self.run_id, params)
        logger.info(
            "MLflow run %s (%s) in experiment %s on %s",
            self.run_id,
            self.run_name,
            self.settings.experiment,
            self.client.uri,
        )

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        if self.run_id:
            self.client.log_metrics(self.run_id, values, step)

    def log_artifacts(self, files: list[tuple[Path, str]]) -> None:
        if self.run_id and self.artifact_uri:
            self.client.log_artifacts(self.artifact_uri, files, self.storage_spec)

    def finish(self, status: str) -> None:
        if self.run_id:
            self.client.set_status(self.run_id, status)

    def state(self) -> dict[str, Any]:
        return {"mlflowRunId": self.run_id} if self.run_id else {}


class TensorBoardSink:
    """TensorBoard event files in ``folder`` (tensorboardX: the event format without TensorFlow)."""

    name = "TensorBoard"
    local = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writer: Any = None

    def start(self, params: Mapping[str, Any], resume: Mapping[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.folder), flush_secs=10)
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("params", "| parameter | value |\n|---|---|\n" + table, 0)

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)

    def log_artifacts(self, files: list[tuple[Path, str]]) -> None:
        pass  # the reports sit beside the event files, in the output folder

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state(self) -> dict[str, Any]:
        return {}


class Tracking:
    """The run's sinks, each guarded (module docstring).

    Args:
        sinks (Iterable[Sink]): where to send.
    """

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)
        self.failures: dict[str, int] = {}
        self.problems: dict[str, str] = {}

    def _guarded(self, sink: Sink, what: str, call) -> bool:
        try:
            call()
            return True
        except Exception as err:  # tracking must never stop training
            count = self.failures.get(sink.name, 0) + 1
            self.failures[sink.name] = count
            message = f"{what}: {err}"
            if count == 1:
                self.problems[sink.name] = message
                logger.warning("%s tracking failed (%s); training continues", sink.name, message)
            else:
                logger.debug("%s tracking failed again (%s)", sink.name, message)
            return False

    def start(self, params: Mapping[str, Any], resume: Mapping[str, Any] | None = None) -> None:
        """Starts every sink; one that fails is dropped (after its one warning)."""
        started = []
        for sink in self.sinks:
            if self._guarded(sink, "could not start the run", lambda s=sink: s.start(params, resume or {})):
                started.append(sink)
        self.sinks = started

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if values:
            for sink in self.sinks:
                self._guarded(
                    sink, f"could not log metrics of step {step}", lambda s=sink: s.log_metrics(values, step)
                )

    def log_artifacts(self, files: Iterable[tuple[Path, str]]) -> None:
        present = [(Path(p), name) for p, name in files if Path(p).is_file()]
        for sink in self.sinks:
            self._guarded(sink, "could not upload the artifacts", lambda s=sink: s.log_artifacts(present))

    def finish(self, status: str = "FINISHED", local_only: bool = False) -> None:
        """Closes the runs; ``local_only`` closes only the sinks that write into the output folder (their
        files must be whole before the folder is published)."""
        for sink in self.sinks:
            if sink.local or not local_only:
                self._guarded(sink, "could not close the run", lambda s=sink: s.finish(status))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sink in self.sinks:
            out.update(sink.state())
        return out

    def save_state(self, folder: str | Path) -> None:
        """Writes ``tracking.json`` into a checkpoint folder (nothing when no sink has state)."""
        state = self.state()
        if state:
            Path(folder, STATE_FILE).write_text(json.dumps(state) + "\n")


def load_state(checkpoint: str | Path | None) -> dict[str, Any]:
    """The ``tracking.json`` of a checkpoint folder, or {}."""
    if checkpoint is None:
        return {}
    path = Path(checkpoint, STATE_FILE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sinks_for(
    settings: TrackingSettings | None,
    output_dir: str | Path,
    run_name: str,
    tags: Mapping[str, str],
    storage_spec: Any = None,
) -> list[Sink]:
    """The sinks ``tracking`` asks for: MLflow when set, TensorBoard event files in
    ``<output>/tensorboard`` when asked for or when there is no MLflow server."""
    settings = settings or TrackingSettings()
    sinks: list[Sink] = []
    if settings.mlflow is not None:
        sinks.append(MlflowSink(settings.mlflow, run_name, tags, storage_spec))
    if settings.tensorboard_on():
        sinks.append(TensorBoardSink(Path(output_dir) / "tensorboard"))
    return sinks


def flat_params(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe's camelCase dict as MLflow parameters: ``{"lora": {"r": 16}}`` -> ``{"lora.r": 16}``."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, name))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | dict) else value
    return out
