"""Resume safety (``visionft.job.resume``): each checkpoint carries a fingerprint of the model and recipe;
re-running into an output folder whose checkpoint belongs to another model or recipe stops before any
training with one line that names ``output.uri`` and what differs (a different LoRA rank, a different
model), and a checkpoint without a fingerprint is checked by its adapter's tensor shapes. The same run
still resumes (tests/trainer/job/test_cli.py)."""

from __future__ import annotations

import json

from visionft.job.cli import EXIT_CONFIG, main
from visionft.job.resume import FINGERPRINT_FILE

from tests.trainer.job.test_cli import config


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_a_checkpoint_of_another_model_or_recipe_is_refused_with_one_clear_line(tmp_path, tiny_dir, capsys):
    path = config(tmp_path, tiny_dir, maxSteps=4, checkpointEverySteps=4)
    assert main([str(path)]) == 0
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    saved = json.loads((checkpoint / FINGERPRINT_FILE).read_text())
    assert saved["lora"]["r"] == 16 and saved["adapter"]["tensors"] > 0
    capsys.readouterr()

    # The same output folder, another LoRA rank: the adapter tensors would not load.
    raw = path.read_text().replace("r: 16", "r: 8")
    path.write_text(raw)
    assert main([str(path)]) == EXIT_CONFIG
    last = _last_error(capsys)
    assert last.startswith(
        f"visionft-train: error: output.uri {tmp_path / 'out'} holds checkpoint-4 of another run"
    )
    assert "lora.r: 8 now, 16 in the checkpoint" in last and "new output.uri" in last
    assert "Traceback" not in last and not (checkpoint.parent / "checkpoint-8").exists()

    # Another model (same recipe): its architecture and uri differ.
    path.write_text(
        raw.replace("r: 8", "r: 16").replace(str(tiny_dir("qwen2_vl")), str(tiny_dir("qwen2_5_vl")))
    )
    assert main([str(path)]) == EXIT_CONFIG
    last = _last_error(capsys)
    assert "holds checkpoint-4 of another run" in last and "model.uri:" in last and "model.model_type" in last


def test_a_checkpoint_without_a_fingerprint_is_checked_by_its_adapter_shapes(tmp_path, tiny_dir, capsys):
    path = config(tmp_path, tiny_dir, maxSteps=4, checkpointEverySteps=4)
    assert main([str(path)]) == 0
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    (checkpoint / FINGERPRINT_FILE).unlink()  # as written by an earlier release
    capsys.readouterr()
    path.write_text(path.read_text().replace("r: 16", "r: 8"))
    assert main([str(path)]) == EXIT_CONFIG
    last = _last_error(capsys)
    assert "holds checkpoint-4 of another run" in last and "shape [8," in last and "in the checkpoint" in last
