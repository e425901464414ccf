"""Evaluation of a run on fixed-shape rows (`training.packing` on a family with rows: tiny Qwen2-VL, CPU),
through `visionft-train`: the evaluation gets the row collator's sample collator (padded batches, prompts
one at a time), scores the base model, each `everySteps` and the output, and writes metrics.json and the
gallery; while it runs during training, the thread that builds the next rows waits (it shares that
sample collator). With the optimizations on (the suite's TRITON_INTERPRET=1 swaps the kernels in on CPU)
the evaluation's no-grad forward runs the plain head, so its loss must be the model's own, not the fused one;
and the run leaves transformers' module functions as it found them.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml
from visionft.data.prefetch import Prefetching
from visionft.job.cli import main
from visionft.job.evaluation import EvaluationStage

pytestmark = pytest.mark.slow

STEPS, EVERY, SAMPLES = 6, 3, 4


@pytest.fixture
def module_rope():
    """Qwen2-VL's module-level rotary functions before the run (the kernels swap them in); put back after
    the test whatever happened, so that later tests in this process never run the interpreted kernel."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    names = ("apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb")  # by transformers release
    originals = {n: getattr(modeling_qwen2_vl, n) for n in names if hasattr(modeling_qwen2_vl, n)}
    yield modeling_qwen2_vl, originals
    for name, fn in originals.items():
        setattr(modeling_qwen2_vl, name, fn)


@pytest.mark.parametrize("optimizations", [False, True], ids=["plain", "optimizations"])
def test_a_packed_run_evaluates_before_during_and_after(tmp_path, monkeypatch, optimizations, module_rope):
    raw = {
        "model": {"uri": "builtin://tiny-qwen2-vl", "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 16, "alpha": 16},
        "dataset": {"uri": "builtin://shapes", "format": "imagefolder", "maxImagePixels": 3136},
        "training": {
            "maxSteps": STEPS,
            "perDeviceBatchSize": 4,
            "learningRate": 5e-3,
            "warmupSteps": 1,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 1000,
            "loggingSteps": 1,
            "seed": 3407,
            "packing": True,
            "optimizations": optimizations,
        },
        "evaluation": {
            "samples": SAMPLES,
            "metrics": ["exactMatch", "cer"],
            "everySteps": EVERY,
            "generation": {"maxNewTokens": 4},
            "gallerySamples": SAMPLES,
        },
        "runtime": {"workDir": str(tmp_path / "work"), "runName": "packed"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    # Whether each evaluation during training ran with the row builder held (the real Prefetching).
    held: list[bool] = []
    inside = [False]
    original_paused, original_step = Prefetching.paused, EvaluationStage.evaluate_step

    @contextlib.contextmanager
    def paused(self):
        with original_paused(self):
            inside[0] = True
            try:
                yield
            finally:
                inside[0] = False

    def evaluate_step(self, model, state):
        held.append(inside[0])
        return original_step(self, model, state)

    monkeypatch.setattr(Prefetching, "paused", paused)
    monkeypatch.setattr(EvaluationStage, "evaluate_step", evaluate_step)

    assert main([str(config)]) == 0
    # The run undid its swaps: a later model in this process gets transformers' own functions.
    module, originals = module_rope
    assert originals and all(getattr(module, n) is fn for n, fn in originals.items())
    out = tmp_path / "work" / "output"
    run = json.loads((out / "run.json").read_text())
    assert run["rows"] is not None and run["rows"]["rows"] == STEPS, run["rows"]  # trained on packed rows
    assert held == [True] * (STEPS // EVERY)

    doc = json.loads((out / "metrics.json").read_text())
    for stage in ("base", "final"):
        values = doc[stage]["values"]
        assert {"exactMatch", "cer", "evalLoss"} <= set(values), values
        assert 0 <= values["exactMatch"] <= 1 and values["evalLoss"] > 0
    assert [e["step"] for e in doc["history"]] == list(range(EVERY, STEPS + 1, EVERY))
    # Six steps at this rate move the teacher-forced loss on the held-out samples.
    assert doc["final"]["values"]["evalLoss"] < doc["base"]["values"]["evalLoss"]
    assert len(doc["perSample"]) == SAMPLES
    gallery = (out / "gallery.html").read_text()
    for entry in doc["perSample"]:
        assert f"#{entry['index']}</small>" in gallery
