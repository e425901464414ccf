"""What `visionft-train FILE` reads (visionft.job.config_file), without training: a VisionFineTune manifest
becomes the same trainer config the operator renders, its cluster-only fields are named and ignored, and
bad input fails with one line naming the field; a trainer config reads as before."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from visionft.job.cli import EXIT_CONFIG, main
from visionft.job.config_file import ConfigFileError, load
from visionft_api import VisionFineTuneSpec
from visionft_operator import children

from tests.operator.specs import edited

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def manifest(tmp_path: Path, edit: dict[str, Any] | None = None, **top: Any) -> Path:
    """The quickstart manifest with `edit` (dotted spec paths; None deletes) and top-level overrides."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc.update(top)
    if edit:
        doc["spec"] = edited(doc["spec"], edit)
    path = tmp_path / "vft.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_quickstart_manifest_becomes_the_operators_trainer_config(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load(QUICKSTART)
    assert loaded.kind == "VisionFineTune"
    config = loaded.config
    assert config.runtime.work_dir == str(tmp_path / "runs" / "quickstart")  # runs/<metadata.name>
    assert config.runtime.status_target is None and not config.runtime.json_progress
    # The recipe is exactly what the operator would mount into the pod (only runtime differs).
    spec = VisionFineTuneSpec.model_validate(yaml.safe_load(QUICKSTART.read_text())["spec"])
    rendered = children.trainer_config(children.Owner("ns", "quickstart", "uid"), spec)
    assert config.model_dump(exclude={"runtime"}) == rendered.model_dump(exclude={"runtime"})
    assert rendered.runtime.run_name == "quickstart"
    assert config.evaluation is not None and config.evaluation.samples == 100 and config.output is None
    assert config.runtime.run_name == "quickstart"  # names the gallery and the tracked run
    (note,) = loaded.notes
    assert note.endswith("cluster-only fields are ignored: resources, runPolicy"), note

    moved = load(QUICKSTART, work_dir=tmp_path / "elsewhere")
    assert moved.config.runtime.work_dir == str(tmp_path / "elsewhere")


def test_a_trainer_config_reads_as_before(tmp_path) -> None:
    raw = {
        "model": {"uri": "../models/base"},
        "dataset": {"uri": "./data", "evalSamples": 3},
        "output": {"uri": "/abs/out"},
        "runtime": {"workDir": "work"},
    }
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    loaded = load(path)
    assert loaded.kind == "trainer config" and loaded.notes == []
    assert loaded.config.model.uri == str(tmp_path / "models" / "base")  # relative to the file
    assert loaded.config.dataset.uri == str(tmp_path / "cfg" / "data")
    assert loaded.config.dataset.eval_samples == 3
    assert load(path, work_dir=tmp_path / "w").config.runtime.work_dir == str(tmp_path / "w")
    raw["runtime"]["evalSamples"] = 3  # moved to dataset.evalSamples
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigFileError, match=r"runtime\.evalSamples: Extra inputs are not permitted"):
        load(path)


def test_credentials_of_a_cluster_secret_come_from_the_environment_locally(tmp_path) -> None:
    path = manifest(
        tmp_path,
        {
            "dataset.uri": "s3://datasets/shapes/",
            "storage": {"endpoint": "http://minio:9000", "credentialsSecret": "team-s3"},
        },
    )
    notes = load(path, env={}).notes
    assert "storage.credentialsSecret" in notes[0]
    assert "team-s3" in notes[1] and "AWS_ACCESS_KEY_ID" in notes[1] and "AWS_SECRET_ACCESS_KEY" in notes[1]
    # With the keys in the environment, there is nothing to say beyond the ignored fields.
    assert len(load(path, env={"AWS_ACCESS_KEY_ID": "x"}).notes) == 1


@pytest.mark.parametrize(
    ("edit", "top", "expected"),
    [
        ({"training.maxStep": 5}, {}, "spec.training.maxStep: Extra inputs are not permitted"),
        ({"resources.gpus": 1}, {}, "spec.resources.gpus: Extra inputs are not permitted"),
        (
            {"model.uri": "builtin://tiny-llama"},
            {},
            "spec.model.uri: a builtin:// model must be one of builtin://tiny-qwen2-vl",
        ),
        (
            {"model.uri": "s3://models/qwen2.5-vl-7b/"},
            {},
            "spec.output: output is required unless model.uri is a generated model",
        ),
        ({"dataset.uri": "data/shapes"}, {}, "spec.dataset.uri: String should match pattern"),
        (
            {},
            {"apiVersion": "visionft.io/v1"},
            "apiVersion is 'visionft.io/v1', expected visionft.io/v1alpha1",
        ),
        ({}, {"kind": "Secret"}, "kind is 'Secret'"),
        ({}, {"metadata": {"labels": {"a": "b"}}}, "metadata.name must be a lowercase DNS name"),
        ({}, {"spec": None}, "spec is required"),
        ({}, {"sepc": {}}, "unknown top-level field sepc"),
    ],
    ids=[
        "spec-typo",
        "cluster-field-typo",
        "unknown-builtin",
        "output-missing",
        "relative-dataset",
        "api-version",
        "kind",
        "no-name",
        "no-spec",
        "top-level-typo",
    ],
)
def test_a_bad_manifest_exits_2_with_one_line_naming_the_field(
    tmp_path, capsys, edit: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    path = manifest(tmp_path, copy.deepcopy(edit), **top)
    assert main([str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("visionft-train: error: "), err
    assert expected in err, err


def test_several_documents_are_refused(tmp_path, capsys) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(QUICKSTART.read_text() + "\n---\n" + QUICKSTART.read_text())
    assert main([str(path)]) == EXIT_CONFIG
    assert "holds 2 YAML documents" in capsys.readouterr().err
