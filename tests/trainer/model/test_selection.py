"""LoRA module selection: the switches, target_modules, the summary counts, and the fallback."""

from __future__ import annotations

import logging

import pytest
from peft.tuners.lora import LoraLayer
from visionft import FastVisionModel
from visionft.model.architectures import get_arch_spec, register_arch, unregister_arch
from visionft.model.classify import Group, classify_linear_modules, count_groups
from visionft.model.lora import lora_summary, select_lora_targets
from visionft.testing.tiny import TINY_ARCHS, build_tiny_vlm

SWITCHES = {
    "finetune_vision_layers": {Group.VISION_ATTN, Group.VISION_MLP},
    "finetune_language_layers": {Group.LANGUAGE_ATTN, Group.LANGUAGE_MLP},
    "finetune_attention_modules": {Group.VISION_ATTN, Group.LANGUAGE_ATTN},
    "finetune_mlp_modules": {Group.VISION_MLP, Group.LANGUAGE_MLP},
}


def _adapted(peft_model) -> set[str]:
    base = peft_model.get_base_model()
    return {name for name, module in base.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama", "pixtral"])
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_off_removes_its_groups(arch, switch):
    model, _ = build_tiny_vlm(arch)
    groups = classify_linear_modules(model)
    peft_model = FastVisionModel.get_peft_model(
        model, r=4, use_gradient_checkpointing=False, **{switch: False}
    )
    adapted = _adapted(peft_model)
    assert adapted
    assert not [n for n in adapted if groups[n] in SWITCHES[switch]]
    expected = {n for n, g in groups.items() if g != Group.OTHER and g not in SWITCHES[switch]}
    assert adapted == expected
    counts = lora_summary(peft_model)
    for group in SWITCHES[switch]:
        assert counts[group.value] == 0
    assert counts["other"] == 0


def test_summary_counts_and_log(caplog):
    model, _ = build_tiny_vlm("qwen2_vl")
    with caplog.at_level(logging.INFO, logger="visionft"):
        peft_model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    # 2 vision blocks (qkv, proj | fc1, fc2) and 2 decoder layers (q, k, v, o | gate, up, down).
    expected = {"vision-attn": 4, "vision-mlp": 4, "language-attn": 8, "language-mlp": 6, "other": 0}
    assert lora_summary(peft_model) == expected
    line = next(r.getMessage() for r in caplog.records if "LoRA on" in r.getMessage())
    assert "LoRA on 22 modules" in line and "vision-attn 4" in line and "language-mlp 6" in line
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert f"trainable parameters: {trainable:,}" in line


def test_target_modules_list_regex_and_explicit_other():
    model, _ = build_tiny_vlm("llava")
    only_q = select_lora_targets(model, ["q_proj"])
    assert only_q and all(n.endswith(".q_proj") for n in only_q)
    regex = select_lora_targets(model, r".*language_model.*\.(q|v)_proj")
    assert regex and all(g == Group.LANGUAGE_ATTN for g in regex.values())
    assert "lm_head" not in select_lora_targets(model)  # all-linear never takes lm_head
    assert select_lora_targets(model, ["lm_head"]) == {"lm_head": Group.OTHER}
    # A list entry may not bring back a group a switch turned off.
    assert not select_lora_targets(model, ["q_proj", "fc1"], finetune_vision_layers=False).keys() & {
        n for n, g in classify_linear_modules(model).items() if g in (Group.VISION_ATTN, Group.VISION_MLP)
    }


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (
            {"finetune_vision_layers": False, "finetune_language_layers": False},
            ("finetune_vision_layers", "finetune_language_layers"),
        ),
        (
            {"finetune_attention_modules": False, "finetune_mlp_modules": False},
            ("finetune_attention_modules", "finetune_mlp_modules"),
        ),
        ({"target_modules": ["no_such_module"]}, ("no_such_module",)),
        ({"target_modules": "(unclosed"}, ("target_modules",)),
        ({"use_gradient_checkpointing": "sometimes"}, ("use_gradient_checkpointing",)),
    ],
)
def test_bad_selection_names_the_argument(kwargs, names):
    model, _ = build_tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError) as err:
        FastVisionModel.get_peft_model(model, **kwargs)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_fallback_agrees_with_registry(arch):
    model, _ = build_tiny_vlm(arch)
    assert classify_linear_modules(model, spec=None) == classify_linear_modules(model)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_registry_paths_exist(arch):
    model, _ = build_tiny_vlm(arch)
    spec = get_arch_spec(model.config.model_type)
    names = [n for n, _ in model.named_modules()]
    for path in (spec.vision, spec.language, *spec.projector):
        assert any(n == path or n.startswith(path + ".") for n in names), path
    # keep_16bit may list paths for sibling towers (llava covers CLIP and Pixtral); each must hit
    # at least one module on one of the tiny models of this spec.
    assert any(any(n == p or n.startswith(p + ".") for n in names) for p in spec.keep_16bit)
    assert "lm_head" in spec.keep_16bit
    counts = count_groups(classify_linear_modules(model))
    assert all(counts[g.value] > 0 for g in Group if g != Group.OTHER)


def test_unmapped_architecture_uses_the_fallback(caplog):
    model, _ = build_tiny_vlm("gemma3")
    spec = unregister_arch("gemma3")
    try:
        with caplog.at_level(logging.WARNING, logger="visionft"):
            peft_model = FastVisionModel.get_peft_model(
                model, r=4, use_gradient_checkpointing=False, finetune_vision_layers=False
            )
        assert any("fallback" in r.getMessage() and "gemma3" in r.getMessage() for r in caplog.records)
        counts = lora_summary(peft_model)
    finally:
        register_arch(spec)
    assert counts["vision-attn"] == counts["vision-mlp"] == 0
    assert counts["language-attn"] == 8 and counts["language-mlp"] == 6
