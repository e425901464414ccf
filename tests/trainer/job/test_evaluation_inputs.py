"""Bad evaluation settings get one clear line naming the field, before any training (and, where the dataset
decides, before the model is even loaded): an unknown metric, a metric that needs references the held-out
split lacks, more samples than the split holds, a split that does not exist. The same checks for
generated datasets run at admission (tests/api/malformed.py)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from visionft.data.synthetic import make_shapes_dataset
from visionft.job.cli import EXIT_CONFIG, main

from tests.trainer.job.recipes import tiny_recipe


def write(tmp_path, tiny_dir, evaluation, data=None):
    data = data or tmp_path / "shapes"
    if not data.exists():
        make_shapes_dataset(data, train_size=16, test_size=8, image_size=56)
    raw = tiny_recipe(tiny_dir("qwen2_vl"), data, tmp_path, max_steps=2, evaluation=evaluation)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(path, capsys, caplog):
    with caplog.at_level(logging.INFO):
        code = main([str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    loaded = any("LoRA on" in r.getMessage() for r in caplog.records)
    return code, err[-1] if err else "", loaded


def test_an_unknown_metric(tmp_path, tiny_dir, capsys, caplog):
    code, line, loaded = run(write(tmp_path, tiny_dir, {"metrics": ["accuracy"]}), capsys, caplog)
    assert code == EXIT_CONFIG and line.startswith("visionft-train: error: invalid trainer config")
    assert "evaluation.metrics.0" in line and "'exactMatch'" in line and "'cer'" in line
    assert not loaded


def test_more_samples_than_the_held_out_split(tmp_path, tiny_dir, capsys, caplog):
    code, line, loaded = run(write(tmp_path, tiny_dir, {"samples": 9}), capsys, caplog)
    assert code == EXIT_CONFIG
    assert line == (
        "visionft-train: error: evaluation.samples is 9, but the held-out split test holds 8 samples: set "
        "evaluation.samples to at most 8 (or hold out more with dataset.validationFraction)"
    )
    assert not loaded and not (tmp_path / "out" / "checkpoints").exists()


def test_a_metric_that_needs_json_references(tmp_path, tiny_dir, capsys, caplog):
    code, line, loaded = run(write(tmp_path, tiny_dir, {"metrics": ["jsonFieldMatch"]}), capsys, caplog)
    assert code == EXIT_CONFIG and not loaded
    assert "evaluation.metrics: jsonFieldMatch can't score held-out sample 0 of split test" in line
    assert "not a non-empty JSON object (dataset.columns.response)" in line


def test_a_held_out_split_with_empty_references(tmp_path, tiny_dir, capsys, caplog):
    data = tmp_path / "unlabelled"
    make_shapes_dataset(data, train_size=16, test_size=8, image_size=56)
    meta = data / "test" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    # An unlabelled test split: the response column is there (imagefolder splits share their columns), empty.
    meta.write_text("".join(json.dumps({**r, "response": ""}) + "\n" for r in rows))
    code, line, loaded = run(write(tmp_path, tiny_dir, {"metrics": ["cer"]}, data=data), capsys, caplog)
    assert code == EXIT_CONFIG and not loaded
    assert (
        "evaluation.metrics: cer can't score held-out sample 0 of split test: its reference answer is empty"
        in line
    )
    assert "dataset.columns.response" in line


@pytest.mark.parametrize(
    ("evaluation", "expected"),
    [
        (
            {"split": "validation"},
            "evaluation.split validation is not a split of the dataset (it has train, test)",
        ),
        ({"split": "train"}, "evaluation.split is train, the split being trained on"),
    ],
)
def test_a_split_that_can_not_serve(tmp_path, tiny_dir, capsys, caplog, evaluation, expected):
    code, line, loaded = run(write(tmp_path, tiny_dir, evaluation), capsys, caplog)
    assert code == EXIT_CONFIG and expected in line and not loaded


def test_no_held_out_samples_at_all(tmp_path, tiny_dir, capsys, caplog):
    data = tmp_path / "train-only"
    make_shapes_dataset(data, train_size=16, test_size=1, image_size=56)
    for path in (data / "test").iterdir():
        path.unlink()
    (data / "test").rmdir()
    code, line, loaded = run(write(tmp_path, tiny_dir, {}, data=data), capsys, caplog)
    assert code == EXIT_CONFIG and not loaded
    assert "evaluation needs held-out samples" in line and "dataset.validationFraction" in line
