"""Progress reporting: one JSON line per logging step on stdout, and ``status.progress`` of the
VisionFineTune through server-side apply.

The status write applies ONLY ``status.progress`` and ``status.evaluation``, on the status subresource,
with the field manager ``visionft-trainer`` (``visionft_api.resource.TRAINER_FIELD_MANAGER``): the operator
owns every other status field under its own manager, and server-side apply keeps the two from overwriting
each other. Every apply carries both fields (the latest evaluation is kept here): server-side apply drops
the fields a manager stops sending. The pod's Role allows ``patch`` on this one resource's status and
nothing else.

Reporting must never stop training: a failed write is logged once (later failures at debug level) and
the next report tries again. Writes are throttled (default one per 5 s) so that a fast loop does not
hammer the apiserver; the final report (``force=True``) always goes out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback as _TrainerBar
from visionft_api.resource import API_VERSION, GROUP, KIND, PLURAL, TRAINER_FIELD_MANAGER, VERSION

logger = logging.getLogger(__name__)

#: TRL's DPO log keys and their names in a progress line and in ``status.progress``.
_REWARD_LOGS = {"rewards/margins": "rewardMargin", "rewards/accuracies": "rewardAccuracy"}


def format_eta(seconds: float | None) -> str | None:
    """``95`` -> ``"1m35s"``; hours appear when needed."""
    if seconds is None:
        return None
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StatusReporter:
    """Server-side applies ``status.progress`` of one VisionFineTune.

    Args:
        namespace (str): the resource's namespace.
        name (str): the resource's name.
        min_interval_s (float): the least time between two writes. Default: 5.
        api: a ``kubernetes.client.CustomObjectsApi``; default: built from the in-cluster config, else
            from ``KUBECONFIG`` / ``~/.kube/config``, on first use.
    """

    def __init__(self, namespace: str, name: str, min_interval_s: float = 5.0, api: Any = None):
        self.namespace = namespace
        self.name = name
        self.min_interval_s = min_interval_s
        self._api = api
        self._last_write = float("-inf")
        self._failed_once = False
        self.evaluation: dict[str, Any] | None = None
        self.writes = 0
        self.failures = 0

    def _client(self):
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def report(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Applies ``progress`` (camelCase keys of ``visionft_api.resource.Progress``) unless throttled.

        Returns:
            bool: whether a write succeeded.
        """
        now = time.monotonic()
        if not force:
            if now - self._last_write < self.min_interval_s:
                return False
            # Only throttled writes open a new window: a forced stage write (Loading, Training) must not
            # hold back the first loss, which `kubectl get vft` should show as soon as there is one.
            self._last_write = now
        progress = {k: v for k, v in progress.items() if v is not None}
        progress["updateTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status: dict[str, Any] = {"progress": progress}
        if self.evaluation is not None:
            status["evaluation"] = self.evaluation
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": status,
        }
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body,
                field_manager=TRAINER_FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _request_timeout=10,
            )
        except Exception as err:  # any failure (network, RBAC, config) must leave training running
            self.failures += 1
            log = logger.debug if self._failed_once else logger.warning
            log(
                "could not report progress to %s/%s (%s: %s); training continues",
                self.namespace,
                self.name,
                type(err).__name__,
                _first_line(err),
            )
            self._failed_once = True
            return False
        self.writes += 1
        return True


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's logs into progress reports: JSON lines and/or status writes.

    Args:
        json_lines (bool): print one JSON object per logging step to ``stream``.
        reporter (StatusReporter | None): also apply the progress to the resource's status.
        stream: where JSON lines go. Default: stdout.
    """

    def __init__(self, json_lines: bool = False, reporter: StatusReporter | None = None, stream=None):
        self.json_lines = json_lines
        self.reporter = reporter
        self.stream = stream or sys.stdout
        self._t0: float | None = None
        self._step0 = 0
        self._last = (0.0, 0)  # (time, tokens) at the previous report
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.monotonic()
        self._step0 = state.global_step  # a resumed run starts mid-way: the ETA counts from here
        self._last = (self._t0, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        self.stage("Training", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return  # evaluation and the final summary have their own keys
        now = time.monotonic()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        dt = now - self._last[0]
        tps = (tokens - self._last[1]) / dt if dt > 0 and tokens else None
        self._last = (now, tokens)
        step, total = state.global_step, state.max_steps
        done = step - self._step0
        eta = (now - (self._t0 or now)) / done * (total - step) if done > 0 and total else None
        record = {
            "event": "progress",
            "step": step,
            "totalSteps": total,
            "epoch": round(state.epoch, 4) if state.epoch is not None else None,
            "loss": logs.get("loss"),
            "lr": logs.get("learning_rate"),
            "tokensPerSecond": round(tps, 1) if tps is not None else None,
            "etaSeconds": round(eta, 1) if eta is not None else None,
        }
        # DPO's reward margin and accuracy (visionft.engine.dpo), where the Trainer logs them.
        for key, name in _REWARD_LOGS.items():
            if key in logs:
                record[name] = round(float(logs[key]), 4)
        self.history.append(record)
        if self.json_lines:
            print(json.dumps(record), file=self.stream, flush=True)
        if self.reporter is not None:
            self.reporter.report(_status_progress(record, stage="Training"))

    def evaluation(self, status: dict[str, Any], stage: str, state=None) -> None:
        """Reports a new ``status.evaluation`` (``EvaluationRecord.status()``) at once, with the stage."""
        if self.json_lines:
            print(json.dumps({"event": "evaluation", **status}), file=self.stream, flush=True)
        if self.reporter is not None:
            self.reporter.evaluation = status
            last = self.history[-1] if self.history else {}
            progress = _status_progress(last, stage=stage)
            if state is not None:
                progress.update(step=state.global_step, totalSteps=state.max_steps or None)
            self.reporter.report(progress, force=True)

    def stage(self, stage: str, state=None, force: bool = True) -> None:
        """Reports a stage change (Downloading, Loading, Training, Uploading, Done) outside the log loop."""
        if self.json_lines:
            print(json.dumps({"event": "stage", "stage": stage}), file=self.stream, flush=True)
        if self.reporter is not None:
            last = self.history[-1] if self.history else {}
            progress = _status_progress(last, stage=stage)
            if state is not None:
                progress.update(step=state.global_step, totalSteps=state.max_steps or None)
            self.reporter.report(progress, force=force)


class LossBar(_TrainerBar):
    """The Trainer's progress bar, showing the latest loss in its postfix instead of printing every log
    dict under it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = getattr(self, "training_bar", None)
        if bar is not None and logs and "loss" in logs:
            bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)


def console_line(line: str) -> None:
    """Prints a line above a running progress bar (tqdm keeps the bar below it)."""
    from tqdm.auto import tqdm

    tqdm.write(line)


#: The Trainer's log keys that are tracked, and their names in the trackers.
_TRACKED_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}


class TrackingCallback(TrainerCallback):
    """Sends the Trainer's training logs to ``visionft.tracking`` (``train/loss``, ``train/learning_rate``,
    ``train/grad_norm``) and writes the tracking state into each checkpoint folder, so that a resumed run
    continues the same tracked run."""

    def __init__(self, tracking):
        self.tracking = tracking

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            values = {
                name: logs[key]
                for key, name in _TRACKED_KEYS.items()
                if isinstance(logs.get(key), int | float)
            }
            self.tracking.log_metrics(values, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = f"{args.output_dir}/checkpoint-{state.global_step}"
            try:
                self.tracking.save_state(folder)
            except OSError as err:
                logger.warning("could not record the tracking run in %s: %s", folder, err)


def _status_progress(record: dict[str, Any], stage: str) -> dict[str, Any]:
    """A progress JSON line in the shape of ``status.progress``."""
    step, total = record.get("step"), record.get("totalSteps")
    percent = int(100 * step / total) if step is not None and total else None
    eta = record.get("etaSeconds")
    return {
        "step": step,
        "totalSteps": total,
        "percent": percent,
        "summary": f"{step}/{total} ({percent}%)" if percent is not None else None,
        "epoch": record.get("epoch"),
        "loss": record.get("loss"),
        **{name: record.get(name) for name in _REWARD_LOGS.values()},
        "learningRate": record.get("lr"),
        "tokensPerSecond": record.get("tokensPerSecond"),
        "etaSeconds": int(eta) if eta is not None else None,
        "eta": format_eta(eta),
        "stage": stage,
    }


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
