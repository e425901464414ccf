"""Tracking on a real MLflow server (its wheel, a SQLite backend store, artifacts on the real S3 server),
read back with MLflow's own client: the run's parameters, the history of the losses and metrics, and the
artifacts (gallery, metrics.json, loss plot, adapter) in the S3 bucket. A run whose server is down still
trains and says so once; a resumed run continues its MLflow run."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from visionft.data.synthetic import make_shapes_dataset
from visionft.job.cli import main
from visionft.tracking.mlflow import MlflowClient

from tests.harness.s3 import free_port
from tests.trainer.job.recipes import tiny_recipe

STEPS = 6


def write(tmp_path, tiny_dir, tracking, evaluation=True):
    data = tmp_path / "shapes"
    if not data.exists():
        make_shapes_dataset(data, train_size=24, test_size=6, image_size=56)
    raw = tiny_recipe(tiny_dir("qwen2_vl"), data, tmp_path, max_steps=STEPS, tracking=tracking)
    raw["runtime"]["runName"] = "tracked-run"
    if evaluation:
        raw["evaluation"] = {
            "samples": 4,
            "metrics": ["cer", "exactMatch"],
            "everySteps": 3,
            "generation": {"maxNewTokens": 4},
        }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.s3
@pytest.mark.mlflow
def test_a_run_on_a_real_mlflow_server(tmp_path, tiny_dir, capsys, mlflow_server, s3_server_session):
    tracking = {"mlflow": {"uri": mlflow_server.uri, "experiment": "visionft-tests"}}
    assert main([str(write(tmp_path, tiny_dir, tracking))]) == 0
    capsys.readouterr()
    run = mlflow_server.read_run("visionft-tests", "tracked-run", tmp_path / "downloaded")
    assert run["status"] == "FINISHED"
    # The recipe, flattened; nothing of runtime or tracking.
    params = run["params"]
    assert params["lora.r"] == "8" and params["training.maxSteps"] == str(STEPS)
    assert params["evaluation.metrics"] == '["cer", "exactMatch"]'
    assert not any(key.startswith(("runtime.", "tracking.")) for key in params)
    # The history of every metric, by step: losses every loggingSteps, evaluations at 0 (the base model)
    # and every everySteps.
    metrics = run["metrics"]
    assert [step for step, _ in metrics["train/loss"]] == [2, 4, 6]
    assert [step for step, _ in metrics["train/learning_rate"]] == [2, 4, 6]
    assert [step for step, _ in metrics["eval/cer"]] == [0, 3, 6]
    assert [step for step, _ in metrics["eval/loss"]] == [0, 3, 6]
    local = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval/cer"][0][1] == pytest.approx(local["base"]["values"]["cer"])
    assert metrics["eval/cer"][-1][1] == pytest.approx(local["final"]["values"]["cer"])
    # The artifacts: the reports and the adapter, read back through the server, stored in the S3 bucket.
    for name in ("gallery.html", "metrics.json", "loss.png", "run.json", "adapter/adapter_model.safetensors"):
        assert name in run["artifacts"], run["artifacts"]
    assert (tmp_path / "downloaded" / "metrics.json").read_text() == (
        tmp_path / "out" / "metrics.json"
    ).read_text()
    bucket, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").split("/", 1)
    listing = s3_server_session.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    keys = [item["Key"] for item in listing.get("Contents", [])]
    assert any(key.endswith(f"{run['run_id']}/artifacts/gallery.html") for key in keys), keys
    assert any(key.endswith(f"{run['run_id']}/artifacts/adapter/adapter_model.safetensors") for key in keys)
    # The run id went into the checkpoint, for a resumed run to continue it.
    state = json.loads(
        (tmp_path / "out" / "checkpoints" / f"checkpoint-{STEPS}" / "tracking.json").read_text()
    )
    assert state == {"mlflowRunId": run["run_id"]}


@pytest.mark.mlflow
def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_dir, capsys, mlflow_server):
    tracking = {"mlflow": {"uri": mlflow_server.uri, "experiment": "visionft-resume", "logAdapter": False}}
    assert main([str(write(tmp_path, tiny_dir, tracking, evaluation=False))]) == 0
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["training"]["maxSteps"] = STEPS + 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main([str(tmp_path / "config.yaml")]) == 0
    assert "resuming from" in capsys.readouterr().out
    run = mlflow_server.read_run("visionft-resume", "tracked-run", tmp_path / "downloaded")
    assert [step for step, _ in run["metrics"]["train/loss"]] == [2, 4, 6, 8]
    assert "adapter/adapter_model.safetensors" not in run["artifacts"]


def test_a_run_whose_server_is_down_trains_and_says_so_once(tmp_path, tiny_dir, capsys, caplog):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING):
        assert main([str(write(tmp_path, tiny_dir, {"mlflow": {"uri": down}}))]) == 0
    capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(said) == 1, said
    assert f"MLflow server {down} unreachable" in said[0] and "training continues" in said[0]
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["steps"] == STEPS and summary["tracking"]["failures"] == {"MLflow": 1}
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "gallery.html").is_file()


def test_the_tracking_token_and_tls_settings_come_from_the_environment():
    client = MlflowClient("http://mlflow:5000/", env={"MLFLOW_TRACKING_TOKEN": "planted-token"})
    assert (
        client.session.headers["Authorization"] == "Bearer planted-token"
        and client.uri == "http://mlflow:5000"
    )
    basic = MlflowClient(
        "http://mlflow:5000", env={"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"}
    )
    assert basic.session.auth == ("u", "p") and "Authorization" not in basic.session.headers
    assert MlflowClient("https://m", env={"MLFLOW_TRACKING_INSECURE_TLS": "true"}).session.verify is False
    assert (
        MlflowClient("https://m", env={"MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem"}).session.verify
        == "/ca.pem"
    )
