"""VisionDPOTrainer on a tiny Qwen2-VL with LoRA (CPU): the reference is the base model with the adapters
disabled (no reference model, no copied adapter, base weights untouched), the loss type reaches TRL's loss,
reward margin and accuracy are logged, and a few steps move the policy towards the chosen answers."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import DPOConfig
from visionft.data.preference import PreferenceCollator
from visionft.engine.dpo import vision_dpo_trainer_class
from visionft.job.preference import answer_log_probs
from visionft.testing.tiny import build_tiny_vlm, tiny_image

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


def pairs(n: int = 8) -> datasets.Dataset:
    names = list(COLOURS)
    rows = {"image": [], "instruction": [], "chosen": [], "rejected": []}
    for i in range(n):
        chosen, rejected = names[i % 4], names[(i + 1 + i // 4) % 4]
        rows["image"].append(tiny_image("qwen2_vl", COLOURS[chosen], seed=i))
        rows["instruction"].append("What colour is the square?")
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
    return datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "instruction": datasets.Value("string"),
                "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"),
            }
        ),
    )


def make_trainer(tmp_path, loss_type: str = "sigmoid", steps: int = 4, lr: float = 5e-3):
    torch.manual_seed(0)
    base, processor = build_tiny_vlm("qwen2_vl")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    collator = PreferenceCollator(model, processor)
    args = DPOConfig(
        output_dir=str(tmp_path / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        beta=0.1,
        loss_type=[loss_type],
        max_length=None,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=True,
        bf16=False,  # DPOConfig's default; the run passes the model's dtype, float32 here
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = vision_dpo_trainer_class()(
        model=model, args=args, train_dataset=pairs(), data_collator=collator, processing_class=processor
    )
    return trainer, model, collator


def test_the_reference_is_the_base_model_with_the_adapters_off(tmp_path):
    trainer, model, collator = make_trainer(tmp_path)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batch = collator([pairs()[i] for i in range(4)])
    device = torch.device("cpu")
    untrained = answer_log_probs(model, batch, device)  # LoRA's B starts at zero: the policy is the base
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    trainer.train()

    # Training moved the adapters, not the base: the reference still gives the untrained log-probs.
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if not p.requires_grad)
    chosen, rejected = trainer.reference_log_probs(batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]), untrained, rtol=1e-4, atol=1e-4)
    trained = answer_log_probs(model, batch, device)
    assert not torch.allclose(trained, untrained, atol=1e-3)
    # The policy now prefers the chosen answers more than the reference does.
    margin = lambda logps: (logps[:4] - logps[4:]).mean()  # noqa: E731
    assert margin(trained) > margin(untrained)
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(logged) == 4 and all(0 <= entry["rewards/accuracies"] <= 1 for entry in logged)


@pytest.mark.parametrize(("loss_type", "first_loss"), [("sigmoid", 0.6931), ("ipo", 25.0), ("hinge", 1.0)])
def test_the_loss_type_reaches_the_loss(tmp_path, loss_type, first_loss):
    # At the first step the policy is the reference (zero log-ratios): sigmoid gives log 2, ipo (1 / 2 beta)^2, hinge 1.
    trainer, _, _ = make_trainer(tmp_path, loss_type=loss_type, steps=1, lr=1e-9)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(first_loss, rel=1e-3)


def test_a_model_without_adapters_is_refused(tmp_path):
    base, processor = build_tiny_vlm("qwen2_vl")
    with pytest.raises(TypeError, match="get_peft_model"):
        vision_dpo_trainer_class()(
            model=base,
            args=DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            train_dataset=pairs(),
            data_collator=PreferenceCollator(base, processor),
            processing_class=processor,
        )
