"""Per architecture: LoRA on vision and language learns, adapters reload under plain PEFT, and the
merged_16bit folder loads under plain transformers with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
from visionft import FastVisionModel
from visionft.testing.tiny import TINY_ARCHS

from tests.trainer.model.batches import build_batch

STEPS = 30


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_lora_learns_reloads_and_merges(arch, tiny_dir, tmp_path):
    model, processor = FastVisionModel.from_pretrained(tiny_dir(arch), load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    batch = build_batch(arch, processor, model.config.model_type)
    assert (batch["labels"] != -100).sum() > 0

    FastVisionModel.for_training(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last <= 0.5 * first, f"{arch}: loss {first:.3f} -> {last:.3f}"

    FastVisionModel.for_inference(model)
    reference = _logits(model, batch)

    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "tokenizer_config.json").is_file()  # the processor came along
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir(arch), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    assert (_logits(reloaded, batch) - reference).abs().max().item() < 1e-5

    model.save_pretrained_merged(
        tmp_path / "merged", processor, save_method="merged_16bit", max_shard_size="200KB"
    )
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged_logits = _logits(merged.eval(), batch)
    rel = (merged_logits - reference).abs().max() / reference.abs().max()
    assert rel.item() < 1e-3
