"""The preference quickstart through the full CLI path: `visionft-train examples/preference-quickstart.yaml`
(a ``method: dpo`` VisionFineTune manifest) generates the preference pairs and the tiny model (builtin://),
trains with DPO on CPU, and the held-out preference accuracy (chosen answer more likely than the rejected one)
rises from about chance to at least 90%; the saved adapter, reloaded with plain PEFT, gives the same
log-probabilities; reward margin and accuracy are logged beside the loss. A DPO manifest that names a column
the dataset lacks is refused naming the field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
VISIONFT_TRAIN = Path(sys.executable).parent / "visionft-train"
MANIFEST = REPO / "examples" / "preference-quickstart.yaml"


def run_train(cwd: Path, manifest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VISIONFT_TRAIN), str(manifest), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
def test_preference_quickstart_learns_to_prefer_the_right_colour(tmp_path):
    (tmp_path / "examples").mkdir()
    shutil.copy(MANIFEST, tmp_path / "examples" / MANIFEST.name)
    result = run_train(tmp_path, Path("examples") / MANIFEST.name)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = {
        when: float(value) / 100
        for when, value in re.findall(
            r"held-out preference accuracy (before|after) training: ([0-9.]+)%", result.stdout
        )
    }
    assert 0.3 <= accuracy["before"] <= 0.7  # a random-weight model: about chance (50%)
    assert accuracy["after"] >= 0.9
    work = tmp_path / "runs" / "preference-quickstart"
    output = work / "output"
    # The DPO metrics, logged every loggingSteps, beside the loss (the source of status.progress).
    state = json.loads(next((output / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert logged and all("rewards/margins" in e and "rewards/accuracies" in e for e in logged)
    assert (
        logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
        and logged[-1]["loss"] < logged[0]["loss"]
    )
    summary = json.loads((output / "run.json").read_text())
    assert summary["eval_samples"] == 100 and summary["accuracy_after"] == accuracy["after"]
    report = json.loads((output / "preference.json").read_text())
    after = report["after"]
    assert after["total"] == 100 and after["accuracy"] == accuracy["after"] and after["meanMargin"] > 0
    print(f"preference quickstart: wall {summary['wall_seconds']:.0f} s, cpu {summary['cpu_seconds']:.0f} s")

    # The adapter reloads with plain transformers + PEFT to the log-probabilities the run reported.
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visionft.data.preference import PreferenceCollator, PreferenceFormatter
    from visionft.job.preference import answer_log_probs

    model_dir = work / "builtin" / "tiny-qwen2-vl"
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, output / "adapter").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    held_out = datasets.load_dataset(
        "imagefolder", data_dir=str(work / "builtin" / "shapes-preference"), split="test"
    )
    columns = {"chosen": "chosen", "rejected": "rejected"}
    collator = PreferenceCollator(model, processor, formatter=PreferenceFormatter(columns))
    for pair in after["pairs"][:8]:
        chosen, rejected = collator.encode_pair(held_out[pair["index"]], index=pair["index"])
        with torch.no_grad():
            logps = answer_log_probs(model, collator.pad([chosen, rejected]), torch.device("cpu"))
        assert logps.tolist() == pytest.approx([pair["chosen"], pair["rejected"]], abs=1e-3)


def test_a_dpo_manifest_naming_a_missing_column_is_refused_naming_the_field(tmp_path):
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["spec"]["dataset"]["columns"]["rejected"] = "worse"
    manifest["spec"]["dataset"]["evalSamples"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = run_train(tmp_path, path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("visionft-train: error: dataset.columns.rejected:") and "'worse'" in last
