"""Acceptance on CPU: `visionft-train` on the built-in task (builtin://shapes, exact match) and on the harder
generated task (builtin://shape-captions, character error rate) evaluates before, during and after
training, and

- the metric improves;
- gallery.html shows exactly the predictions and scores of metrics.json, worst first;
- the best checkpoint is the best evaluation by keepBest's metric, kept in <output>/best/ past
  keepCheckpoints, and the published adapter holds its weights (test_evaluation_stage.py covers a best
  that is not the last step);
- a plain transformers + PEFT reload of the published adapter answers exactly as metrics.json says;
- the console shows the summary table and the progress bar, and no raw Trainer log dict;
- TensorBoard event files (the default tracker) hold the training loss and the evaluations.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from visionft.job.cli import main

pytestmark = pytest.mark.slow

TASKS = {
    # The colour of one shape: the quickstart's task.
    "shapes": {
        "dataset": "builtin://shapes",
        "metrics": ["exactMatch", "cer"],
        "steps": 80,
        "every": 20,
        "lr": 5e-3,
        "better": lambda before, after: before < 0.5 and after >= 0.8,
    },
    # Colour and shape in two words: the shape takes far longer to learn than the colour.
    "shape-captions": {
        "dataset": "builtin://shape-captions",
        "metrics": ["cer", "wer", "exactMatch"],
        "steps": 120,
        "every": 40,
        "lr": 1e-2,
        # The random model's answers are longer than the references; the trained one's are right in
        # length and colour, and mostly in shape.
        "better": lambda before, after: before > 0.8 and after < 0.45,
    },
}


def write_config(tmp_path: Path, task: dict, work: Path) -> Path:
    raw = {
        "model": {"uri": "builtin://tiny-qwen2-vl", "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 16, "alpha": 16},
        "dataset": {"uri": task["dataset"], "format": "imagefolder", "maxImagePixels": 3136},
        "training": {
            "maxSteps": task["steps"],
            "perDeviceBatchSize": 8,
            "learningRate": task["lr"],
            "warmupSteps": 5,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 1000,
            "keepCheckpoints": 1,
            "loggingSteps": 10,
            "seed": 3407,
            "optimizations": False,
        },
        "evaluation": {
            "samples": 24,
            "metrics": task["metrics"],
            "everySteps": task["every"],
            "keepBest": {"useForOutput": True},
            "generation": {"maxNewTokens": 8},
            "gallerySamples": 16,
        },
        "runtime": {"workDir": str(work), "runName": "acceptance"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def gallery_rows(text: str) -> list[dict[str, str]]:
    """Each sample row of gallery.html: its index, reference, answers before and after, and their scores."""
    rows = []
    for row in re.findall(r"<tr><td>\d+<br><small>#(\d+)</small>(.*?)</tr>", text, flags=re.DOTALL):
        index, cells = row
        pres = [html.unescape(p) for p in re.findall(r"<pre>(.*?)</pre>", cells, flags=re.DOTALL)]
        scores = re.findall(r"<small>(\w+) ([0-9.]+)</small>", cells)
        rows.append(
            {
                "index": int(index),
                "reference": pres[1],
                "before": pres[2].replace("\xa0", ""),
                "after": pres[3].replace("\xa0", ""),
                "scores": scores,
            }
        )
    return rows


def plain_peft_answers(model_dir: Path, adapter: Path, records: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers of transformers' model with the adapter loaded by PEFT: no visionft code."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    answers = []
    for record in records:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["instruction"]}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.open(record["path"]).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        answers.append(
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


@pytest.mark.parametrize("name", list(TASKS))
def test_evaluated_run(tmp_path, capsys, name):
    task = TASKS[name]
    work = tmp_path / "work"
    assert main([str(write_config(tmp_path, task, work))]) == 0
    console = capsys.readouterr()
    out = work / "output"
    doc = json.loads((out / "metrics.json").read_text())
    metric = task["metrics"][0]

    # The metric improves.
    before, after = doc["base"]["values"][metric], doc["final"]["values"][metric]
    assert task["better"](before, after), (before, after)
    evaluated = list(range(task["every"], task["steps"] + 1, task["every"]))
    assert [e["step"] for e in doc["history"]] == evaluated

    # The best checkpoint: the best evaluation during training (strictly better wins, so the earliest
    # of equals), kept in <output>/best/ (outside checkpoints/, which keepCheckpoints 1 rotates), and the
    # published adapter is its weights.
    higher = doc["higherIsBetter"][metric]
    values = [(e["values"][metric], e["step"]) for e in doc["history"]]
    best_value = max(v for v, _ in values) if higher else min(v for v, _ in values)
    best_step = min(s for v, s in values if v == best_value)
    assert doc["best"]["step"] == best_step and doc["outputFrom"] == "best"
    assert doc["final"]["values"][metric] == pytest.approx(best_value)
    kept = json.loads((out / "best" / "best.json").read_text())
    assert kept["step"] == best_step and kept["values"][metric] == pytest.approx(best_value)
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{task['steps']}"]
    published = load_file(out / "adapter" / "adapter_model.safetensors")
    best = load_file(out / "best" / "adapter" / "adapter_model.safetensors")
    assert published.keys() == best.keys()
    assert all(torch.equal(published[k], best[k]) for k in published)

    # The gallery shows metrics.json's predictions and per-sample scores, worst first.
    per_sample = {entry["index"]: entry for entry in doc["perSample"]}
    rows = gallery_rows((out / "gallery.html").read_text())
    assert len(rows) == 16 and "<script" not in (out / "gallery.html").read_text()
    for row in rows:
        entry = per_sample[row["index"]]
        assert row["reference"] == entry["reference"]
        assert row["before"] == entry["before"]["prediction"]
        assert row["after"] == entry["after"]["prediction"]
        shown = dict(row["scores"])
        assert float(shown[metric]) == pytest.approx(entry["after"]["scores"][metric], abs=5e-4)
    key = [per_sample[r["index"]]["after"]["scores"][metric] for r in rows]
    assert key == sorted(key, reverse=not higher)  # worst first
    # The corpus value is what the per-sample answers give.
    from visionft.evaluation.metrics import score

    answers = [entry["after"]["prediction"] for entry in doc["perSample"]]
    references = [entry["reference"] for entry in doc["perSample"]]
    assert score(metric, answers, references).value == pytest.approx(after)

    # A plain transformers + PEFT reload of the published adapter gives the same answers.
    dataset = work / "builtin" / task["dataset"].removeprefix("builtin://") / "test"
    lines = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()][:24]
    records = [{"instruction": r["instruction"], "path": dataset / r["file_name"]} for r in lines]
    model_dir = work / "builtin" / "tiny-qwen2-vl"
    assert plain_peft_answers(model_dir, out / "adapter", records, 8) == answers

    # The console: a summary table, the progress bar, no raw log dict of the Trainer.
    assert "metric" in console.out and "before" in console.out and "best @ step" in console.out
    assert re.search(rf"^{metric}\b.*@ {best_step}$", console.out, flags=re.MULTILINE), console.out
    assert "it/s" in console.err or "s/it" in console.err  # tqdm's bar
    assert "{'loss'" not in console.out + console.err and "'train_runtime'" not in console.out + console.err

    # TensorBoard event files (no MLflow server set): training loss and every evaluation, base included.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(10, task["steps"] + 1, 10))
    assert [e.step for e in events.Scalars(f"eval/{metric}")] == [0, *evaluated]
    assert events.Scalars(f"eval/{metric}")[0].value == pytest.approx(before, rel=1e-6)
