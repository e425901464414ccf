"""Progress reporting: the status write is a server-side apply of status.progress (and status.evaluation,
kept in every later write) only, under the visionft-trainer field manager (on the real control plane); an
unreachable apiserver never stops training; writes are throttled; the loss-curve PNG."""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path

import pytest
import yaml
from visionft.job.plotting import draw, save_loss_curve
from visionft.job.reporting import ProgressCallback, StatusReporter, format_eta
from visionft_api.resource import API_VERSION, GROUP, KIND, PLURAL, TRAINER_FIELD_MANAGER, VERSION

REPO = Path(__file__).resolve().parents[3]


def unreachable_api():
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:1"  # nothing listens on port 1
    configuration.retries = 0
    return client.CustomObjectsApi(client.ApiClient(configuration))


def test_failed_reports_never_raise_log_once_and_are_throttled(caplog):
    reporter = StatusReporter("team-a", "job", min_interval_s=60, api=unreachable_api())
    with caplog.at_level(logging.DEBUG, logger="visionft.job.reporting"):
        assert reporter.report({"step": 1, "totalSteps": 10}) is False
        assert reporter.report({"step": 2, "totalSteps": 10}) is False  # throttled: no attempt
        assert reporter.report({"step": 3, "totalSteps": 10}, force=True) is False
    assert reporter.failures == 2 and reporter.writes == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training continues" in warnings[0].getMessage()


def test_a_forced_stage_write_does_not_hold_back_the_first_loss():
    reporter = StatusReporter("team-a", "job", min_interval_s=60, api=unreachable_api())
    assert reporter.report({"stage": "Training"}, force=True) is False  # attempted (and failed)
    assert reporter.report({"step": 1, "loss": 2.0}) is False  # attempted too: not throttled
    assert reporter.report({"step": 2, "loss": 1.9}) is False  # now throttled: no attempt
    assert reporter.failures == 2


def test_progress_callback_json_lines(capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = ProgressCallback(json_lines=True, reporter=StatusReporter("ns", "n", api=unreachable_api()))
    state = TrainerState()
    state.max_steps, state.global_step, state.epoch = 10, 0, 0.0
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step, state.epoch, state.num_input_tokens_seen = 4, 0.4, 2000
    callback.on_log(args, state, TrainerControl(), logs={"loss": 1.5, "learning_rate": 1e-4})
    callback.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.0})  # not a training log: ignored
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [line for line in lines if line["event"] == "progress"]
    assert len(progress) == 1
    assert progress[0]["step"] == 4 and progress[0]["totalSteps"] == 10 and progress[0]["loss"] == 1.5
    assert progress[0]["lr"] == 1e-4 and progress[0]["etaSeconds"] >= 0
    assert [line["stage"] for line in lines if line["event"] == "stage"] == ["Training"]


def test_dpo_reward_margin_and_accuracy_reach_the_progress_line_and_the_status():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    class Recorder(StatusReporter):
        def report(self, progress, force=False):
            self.sent.append(progress)
            return True

    reporter = Recorder("ns", "n", api=unreachable_api())
    reporter.sent = []
    stream = io.StringIO()
    callback = ProgressCallback(json_lines=True, reporter=reporter, stream=stream)
    state = TrainerState()
    state.max_steps, state.global_step, state.epoch = 10, 0, 0.0
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step = 5
    logs = {"loss": 0.4, "learning_rate": 1e-5, "rewards/margins": 1.23456, "rewards/accuracies": 0.875}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    line = next(json.loads(x) for x in stream.getvalue().splitlines() if '"progress"' in x)
    assert line["rewardMargin"] == 1.2346 and line["rewardAccuracy"] == 0.875
    status = reporter.sent[-1]
    assert status["rewardMargin"] == 1.2346 and status["rewardAccuracy"] == 0.875 and status["loss"] == 0.4
    # A supervised run's lines carry no reward fields.
    callback.on_log(args, state, TrainerControl(), logs={"loss": 0.3, "learning_rate": 1e-5})
    assert "rewardMargin" not in json.loads(stream.getvalue().splitlines()[-1])


def test_format_eta():
    assert [format_eta(s) for s in (None, 0, 59, 95, 3600 + 120)] == [None, "0s", "59s", "1m35s", "1h02m"]


def test_loss_curve_png(tmp_path):
    history = [{"step": s, "loss": 5 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.7}]
    path = save_loss_curve(history, tmp_path / "out" / "loss.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 2000
    assert save_loss_curve([{"train_runtime": 1.0}], tmp_path / "none.png") is None


def test_the_loss_plot_draws_training_and_eval_loss_and_the_metric_over_steps():
    import matplotlib.pyplot as plt

    # A log history as the evaluation stage leaves it: losses every 2 steps, evaluations at 4 and 8.
    history = [{"step": s, "loss": 4.0 / s} for s in range(2, 9, 2)]
    history += [
        {"step": 4, "eval_loss": 1.5, "eval_cer": 0.6},
        {"step": 8, "eval_loss": 1.0, "eval_cer": 0.3},
    ]
    fig = draw(history, metric="cer", base=0.9)
    try:
        losses, metric = fig.axes
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in losses.lines}
        assert lines["train"] == ([2, 4, 6, 8], [2.0, 1.0, 4.0 / 6, 0.5])
        assert lines["eval"] == ([4, 8], [1.5, 1.0])
        (cer,) = metric.lines
        assert (list(cer.get_xdata()), list(cer.get_ydata())) == ([0, 4, 8], [0.9, 0.6, 0.3])
        assert metric.get_ylabel() == "cer"
    finally:
        plt.close(fig)
    alone = draw(history)  # without evaluation: the loss panel only
    assert len(alone.axes) == 1
    plt.close(alone)


def _resource(kube_client, namespace: str, prefix: str, **spec):
    """Installs the CRD, creates a VisionFineTune and returns ``(CustomObjectsApi, name)``."""
    from kubernetes import client, dynamic

    crd = yaml.safe_load((REPO / "crds" / "visionft.io_visionfinetunes.yaml").read_text())
    dyn = dynamic.DynamicClient(kube_client)
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    crds.server_side_apply(body=crd, field_manager="test", force_conflicts=True)
    _wait_established(kube_client, crd["metadata"]["name"])
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://data/shapes/"},
            "output": {"uri": "s3://out/shapes/"},
            **spec,
        },
    }
    api = client.CustomObjectsApi(kube_client)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return api, name


@pytest.mark.cluster
def test_status_progress_is_applied_with_the_trainer_field_manager(kube_client, kubeconfig, namespace):
    api, name = _resource(kube_client, namespace, "job")

    reporter = StatusReporter(namespace, name, api=api)
    assert reporter.report({"step": 3, "totalSteps": 30, "percent": 10, "loss": 1.25, "stage": "Training"})
    obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    progress = obj["status"]["progress"]
    assert progress["step"] == 3 and progress["totalSteps"] == 30 and progress["loss"] == 1.25
    assert progress["updateTime"].endswith("Z")
    assert obj["spec"] == api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["spec"]
    mine = [m for m in obj["metadata"]["managedFields"] if m["manager"] == TRAINER_FIELD_MANAGER]
    assert len(mine) == 1 and mine[0]["operation"] == "Apply" and mine[0]["subresource"] == "status"
    owned = mine[0]["fieldsV1"]
    assert set(owned) == {"f:status"} and set(owned["f:status"]) == {"f:progress"}

    # A later report replaces the trainer's fields; a throttled one does not write.
    assert reporter.report({"step": 4, "totalSteps": 30}, force=True)
    assert not reporter.report({"step": 5, "totalSteps": 30})
    progress = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"]["progress"]
    assert progress["step"] == 4 and "loss" not in progress


@pytest.mark.cluster
def test_status_evaluation_is_kept_by_later_progress_writes(kube_client, kubeconfig, namespace):
    api, name = _resource(kube_client, namespace, "eval", evaluation={"metrics": ["cer"], "everySteps": 10})
    evaluation = {
        "metric": "cer",
        "higherIsBetter": False,
        "samples": 24,
        "base": {"step": 0, "value": 0.91, "values": {"cer": 0.91, "evalLoss": 6.2}},
        "latest": {"step": 10, "value": 0.4, "values": {"cer": 0.4, "evalLoss": 1.1}},
        "best": {"step": 10, "value": 0.4, "metric": "cer", "values": {"cer": 0.4}},
        "summary": "cer 0.910 -> 0.400 (best 0.400 @ 10)",
    }
    callback = ProgressCallback(reporter=StatusReporter(namespace, name, min_interval_s=0, api=api))
    callback.evaluation(evaluation, "Training")
    # A later progress write does not carry the evaluation in its arguments: it must not drop it.
    assert callback.reporter is not None
    assert callback.reporter.report({"step": 11, "totalSteps": 30, "stage": "Training"}, force=True)
    obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert obj["status"]["evaluation"] == evaluation
    assert obj["status"]["progress"]["step"] == 11
    mine = [m for m in obj["metadata"]["managedFields"] if m["manager"] == TRAINER_FIELD_MANAGER]
    assert set(mine[0]["fieldsV1"]["f:status"]) == {"f:progress", "f:evaluation"}
    # The printer column shows the headline metric.
    response = kube_client.call_api(
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _preload_content=False,
    )
    table = json.loads(response.data)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert table["rows"][0]["cells"][columns.index("Eval")] == "cer 0.910 -> 0.400 (best 0.400 @ 10)"


def _wait_established(kube_client, name: str, timeout: float = 30.0) -> None:
    import time

    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube_client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conditions = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.2)
    raise AssertionError(f"CRD {name} not established after {timeout} s")
