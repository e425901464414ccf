"""FastVisionModel.from_pretrained on CPU: the 4-bit fallback warning and the argument errors."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from visionft import FastVisionModel
from visionft.model.info import get_load_info
from visionft.testing.tiny import build_tiny_vlm

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


def test_4bit_on_cpu_warns_once_and_loads_fp32(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING):
        model, processor = FastVisionModel.from_pretrained(
            tiny_dir("llava"), load_in_4bit=True, max_seq_length=512
        )
    warnings = [r for r in caplog.records if "4bit" in r.getMessage() and "GPU" in r.getMessage()]
    assert len(warnings) == 1
    assert next(model.parameters()).dtype == torch.float32
    info = get_load_info(model)
    assert info.quantization is None and info.max_seq_length == 512 and model.max_seq_length == 512
    assert processor.tokenizer is not None


def test_no_warning_when_4bit_is_off(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING):
        FastVisionModel.from_pretrained(tiny_dir("llava"), load_in_4bit=False)
    assert not [r for r in caplog.records if "GPU" in r.getMessage()]


def test_both_4bit_and_8bit(tiny_dir):
    with pytest.raises(ValueError, match="load_in_4bit=True and load_in_8bit=True"):
        FastVisionModel.from_pretrained(tiny_dir("llava"), load_in_4bit=True, load_in_8bit=True)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FastVisionModel.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        FastVisionModel.from_pretrained(tmp_path)


def test_uri_is_rejected():
    with pytest.raises(ValueError, match="sync it to a local folder"):
        FastVisionModel.from_pretrained("s3://models/qwen/")


def test_text_only_model_lists_supported_types(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an image-text-to-text model") as err:
        FastVisionModel.from_pretrained(tmp_path, load_in_4bit=False)
    assert "qwen2_5_vl" in str(err.value) and "mllama" in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, "2048"])
def test_bad_max_seq_length(tiny_dir, bad):
    with pytest.raises(ValueError, match="max_seq_length"):
        FastVisionModel.from_pretrained(tiny_dir("llava"), max_seq_length=bad)


def test_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        FastVisionModel.from_pretrained(tiny_dir("llava"), dtype="int8", load_in_4bit=False)


def test_merged_4bit_needs_cuda(tmp_path):
    model, processor = build_tiny_vlm("llava")
    model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        model.save_pretrained_merged(tmp_path / "m4", processor, save_method="merged_4bit")
    with pytest.raises(ValueError, match="save_method"):
        model.save_pretrained_merged(tmp_path / "m", processor, save_method="gguf")


def test_for_training_and_inference_toggle_modes():
    model, _ = build_tiny_vlm("qwen2_vl")
    model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    FastVisionModel.for_training(model)
    assert model.training and model.config.use_cache is False
    assert (
        model.get_base_model().is_activation_checkpointing or model.get_base_model().is_gradient_checkpointing
    )
    FastVisionModel.for_inference(model)
    assert not model.training and model.config.use_cache is True
