"""The evaluation stage's best checkpoint (visionft.job.evaluation) on a real tiny model: with
keepBest.useForOutput the output is the best evaluation's weights even when a later step is worse, the
best one is kept in <output>/best/, and a resumed run reads its earlier evaluations and best back."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import TrainerState
from visionft.data.formats import MessagesFormatter, load_local_dataset
from visionft.data.synthetic import make_shapes_dataset
from visionft.engine.options import EngineOptions
from visionft.job import run
from visionft.job.cli import main
from visionft.job.evaluation import EvaluationStage
from visionft_api import TrainerConfig

from tests.trainer.job.recipes import tiny_recipe


def recipe(tmp_path, tiny_dir, data, **evaluation):
    settings = {"samples": 4, "everySteps": 2, "generation": {"maxNewTokens": 4}, **evaluation}
    return tiny_recipe(tiny_dir("qwen2_vl"), data, tmp_path, evaluation=settings)


def lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_use_for_output_puts_the_best_weights_back_when_a_later_step_is_worse(tmp_path, tiny_dir):
    data = tmp_path / "shapes"
    make_shapes_dataset(data, train_size=8, test_size=4, image_size=56)
    raw = recipe(
        tmp_path, tiny_dir, data, metrics=["cer"], keepBest={"metric": "evalLoss", "useForOutput": True}
    )
    config = TrainerConfig.model_validate(raw)
    out = tmp_path / "out"
    out.mkdir()
    stage, _, _ = EvaluationStage.prepare(config, load_local_dataset(data), out, MessagesFormatter())
    assert stage is not None
    options = EngineOptions.from_recipe(config.training)
    model, processor, report, options = run._load_model(config, tiny_dir("qwen2_vl"), options)
    collator = run._collator(config, model, processor, data, options, report, None)
    stage.attach(collator, echo=lambda line: None)
    stage.evaluate_base(model)

    state = TrainerState()
    state.global_step = 2
    good = lora_b(model)  # B = 0: the base model, at its loss
    assert stage.evaluate_step(model, state)  # the first evaluation during training is a best
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2
    torch.manual_seed(0)
    with torch.no_grad():  # "training" that went wrong: large random adapters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    state.global_step = 4
    assert not stage.evaluate_step(model, state)
    step2, step4 = stage.record.history
    assert step4.values["evalLoss"] > step2.values["evalLoss"]
    assert stage.record.best is not None and stage.record.best.step == 2

    final = stage.finish(model, 4)
    assert stage.record.output_from == "best"
    now = lora_b(model)
    assert now.keys() == good.keys() and all(torch.equal(now[k], good[k]) for k in now)
    assert final.values == pytest.approx(step2.values)  # the output's evaluation is the best's
    assert [e.step for e in stage.record.history] == [2, 4]
    # Each evaluation is in the Trainer's log history, for the loss plot and a resumed run.
    assert [e["step"] for e in state.log_history] == [2, 4] and "eval_cer" in state.log_history[0]


def test_a_resumed_run_keeps_its_earlier_evaluations_and_its_best(tmp_path, tiny_dir, capsys):
    data = tmp_path / "shapes"
    make_shapes_dataset(data, train_size=16, test_size=4, image_size=56)
    raw = recipe(tmp_path, tiny_dir, data, metrics=["cer"], keepBest={"useForOutput": True})
    raw["training"]["checkpointEverySteps"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 0
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    raw["training"]["maxSteps"] = 6
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 0
    assert "resuming from" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [e["step"] for e in doc["history"]] == [2, 4, 6]
    assert doc["history"][:2] == first["history"]  # read back from the checkpoint, not re-run
    values = {e["step"]: e["values"]["cer"] for e in doc["history"]}
    best = min(values.values())
    assert doc["best"]["step"] == min(s for s, v in values.items() if v == best)
