"""``visionft-train`` end to end on CPU with a tiny model: loss falls, adapter, loss curve and summary are
written, JSON progress lines parse, a second run resumes from the newest checkpoint; config and data errors
exit non-zero with one clear line and print no secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from visionft.data.synthetic import make_shapes_dataset
from visionft.job.cli import EXIT_CONFIG, main

SECRET = "planted-secret-value-1234"


def config(tmp_path, tiny_dir, **training):
    data = tmp_path / "shapes"
    if not data.exists():
        make_shapes_dataset(data, train_size=48, test_size=8, image_size=56)
    raw = {
        "model": {"uri": str(tiny_dir("qwen2_vl")), "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 16, "alpha": 16},
        "dataset": {"uri": str(data), "format": "auto", "evalSamples": 4},
        "training": {
            "maxSteps": 20,
            "perDeviceBatchSize": 4,
            "learningRate": 5e-3,
            "warmupSteps": 2,
            "optimizer": "adamw_8bit",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 10,
            "keepCheckpoints": 1,
            "loggingSteps": 4,
            "optimizations": False,
            **training,
        },
        "output": {"uri": str(tmp_path / "out"), "saveMethod": "lora"},
        "runtime": {"workDir": str(tmp_path / "work"), "jsonProgress": True},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def progress_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"event": "progress"')]


def test_train_end_to_end_then_resume(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    path = config(tmp_path, tiny_dir)
    assert main(["--config", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    lines = progress_lines(captured.out)
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 20]
    for record in lines:
        assert record["totalSteps"] == 20 and record["lr"] > 0 and record["etaSeconds"] >= 0
        assert record["tokensPerSecond"] > 0
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]  # the loss falls
    # dataset.evalSamples: the shorthand for an evaluation by normalizedExactMatch before and after.
    assert "evaluation of the base model on 4 held-out samples: normalizedExactMatch" in out
    assert "evaluation of the output, the last step (20): normalizedExactMatch" in out
    assert SECRET not in out

    result = tmp_path / "out"
    assert (result / "adapter" / "adapter_config.json").is_file()
    assert (result / "adapter" / "adapter_model.safetensors").is_file()
    png = (result / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    summary = json.loads((result / "run.json").read_text())
    assert summary["steps"] == 20 and summary["eval_samples"] == 4
    assert sorted(p.name for p in (result / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-20"
    ]  # keepCheckpoints 1

    # A longer second run resumes from the newest complete checkpoint instead of starting over.
    path = config(tmp_path, tiny_dir, maxSteps=24)
    assert main([str(path)]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.out and "checkpoint-20" in captured.out
    assert [r["step"] for r in progress_lines(captured.out)] == [24]
    assert json.loads((result / "run.json").read_text())["steps"] == 24


def run_cli(*args, env_extra=None):
    import os

    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "visionft.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_missing_and_invalid_configs_exit_2_with_one_line(tmp_path):
    missing = run_cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == EXIT_CONFIG
    assert missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "model": {"uri": "/m"},
                "dataset": {"uri": "/d"},
                "output": {"uri": "/o"},
                "training": {"maxSteps": 3, "epochs": 1},
            }
        )
    )
    invalid = run_cli(str(bad))
    assert invalid.returncode == EXIT_CONFIG
    assert invalid.stderr.strip().count("\n") == 0
    assert "set exactly one of maxSteps and epochs" in invalid.stderr

    none = run_cli()
    assert none.returncode == EXIT_CONFIG and "--config FILE" in none.stderr


def test_missing_dataset_exits_2_naming_it(tmp_path, tiny_dir):
    path = config(tmp_path, tiny_dir)
    raw = yaml.safe_load(path.read_text())
    raw["dataset"]["uri"] = str(tmp_path / "no-such-dataset")
    path.write_text(yaml.safe_dump(raw))
    result = run_cli(str(path))
    assert result.returncode == EXIT_CONFIG
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("visionft-train: error: dataset.uri") and "does not exist" in last
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_bad_image_in_the_dataset(tmp_path, tiny_dir, capsys, policy):
    path = config(tmp_path, tiny_dir, maxSteps=2, loggingSteps=1)
    raw = yaml.safe_load(path.read_text())
    raw["dataset"]["onBadSample"] = policy
    raw["dataset"]["evalSamples"] = 0
    path.write_text(yaml.safe_dump(raw))
    meta = tmp_path / "shapes" / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    for row in rows[::2]:  # half the images: the seeded sampler certainly draws some of them
        (tmp_path / "shapes" / "train" / row["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    code = main([str(path)])
    captured = capsys.readouterr()
    if policy == "error":
        assert code == EXIT_CONFIG
        assert "visionft-train: error: sample " in captured.err and "corrupt" in captured.err
    else:
        assert code == 0
        summary = json.loads((tmp_path / "out" / "run.json").read_text())
        assert summary["skipped_samples"] > 0 and summary["steps"] == 2
        assert "skipped" in captured.out


@pytest.mark.s3
def test_s3_dataset_model_and_output_with_resume_on_a_fresh_pod(tmp_path, tiny_dir, capsys, s3_bucket):
    from visionft.storage import MANIFEST_NAME, make_client, upload_folder

    local = config(tmp_path, tiny_dir, maxSteps=10, checkpointEverySteps=5, loggingSteps=5)
    raw = yaml.safe_load(local.read_text())
    client = make_client()
    upload_folder(raw["dataset"]["uri"], s3_bucket.uri("data/shapes/"), client=client)
    upload_folder(raw["model"]["uri"], s3_bucket.uri("models/tiny/"), client=client)
    raw["dataset"]["uri"] = s3_bucket.uri("data/shapes/")
    raw["model"]["uri"] = s3_bucket.uri("models/tiny/")
    raw["output"]["uri"] = s3_bucket.uri("out/run1/")
    raw["runtime"]["workDir"] = str(tmp_path / "pod1")
    raw["dataset"]["evalSamples"] = 0
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 0
    capsys.readouterr()

    def keys():
        listing = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="out/run1/")
        return {item["Key"].removeprefix("out/run1/") for item in listing.get("Contents", [])}

    published = keys()
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "loss.png",
        "run.json",
        MANIFEST_NAME,
    ):
        assert name in published, sorted(published)
    assert any(k.startswith("checkpoints/") for k in published)

    # A new pod (empty work dir) asked for more steps resumes from the checkpoint in S3.
    raw["training"]["maxSteps"] = 15
    raw["runtime"]["workDir"] = str(tmp_path / "pod2")
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-10" in out
    run = json.loads(client.get_object(Bucket=s3_bucket.name, Key="out/run1/run.json")["Body"].read())
    assert run["steps"] == 15


def test_a_manifest_with_generated_sources_runs_here_and_each_run_starts_over(tmp_path, capsys, monkeypatch):
    # A VisionFineTune like examples/quickstart.yaml, shortened: builtin:// model and dataset, no output.
    monkeypatch.chdir(tmp_path)
    doc = {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {"name": "smoke"},
        "spec": {
            "model": {"uri": "builtin://tiny-qwen2-vl", "loadIn4bit": False, "maxSeqLength": 256},
            "dataset": {"uri": "builtin://shapes", "maxImagePixels": 3136, "evalSamples": 4},
            "training": {
                "maxSteps": 4,
                "perDeviceBatchSize": 2,
                "learningRate": 5e-3,
                "optimizer": "adamw_torch",
                "gradientCheckpointing": "off",
                "checkpointEverySteps": 2,
                "keepCheckpoints": 1,
                "optimizations": False,
            },
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
            "queueName": "cpu-queue",
        },
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(doc))
    output = tmp_path / "runs" / "smoke" / "output"  # <workDir>/output, workDir = runs/<metadata.name>
    for _ in range(2):
        assert main([str(path)]) == 0
        captured = capsys.readouterr()
        assert "evaluation of the base model on 4 held-out samples" in captured.out
        assert "resuming from" not in captured.out  # no output: every run trains from the first step
        summary = json.loads((output / "run.json").read_text())
        assert summary["steps"] == 4 and summary["eval_samples"] == 4
        assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "smoke" / "builtin").iterdir()) == [
        "shapes",
        "tiny-qwen2-vl",
    ]
