"""The architecture families: each entry's patch set, row module and modeling modules exist, its packing,
row and graph-step flags match what the patch modules cover, and every per-architecture lookup reads the
one table."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from visionft.engine.cuda_graphs import model_reason
from visionft.engine.options import EngineOptions
from visionft.model.architectures import (
    FAMILIES,
    ArchSpec,
    get_arch_spec,
    packing_unsupported_reason,
    register_arch,
    unregister_arch,
)
from visionft.patching import patch_set, revert_optimizations
from visionft.patching.packed_attention import TEXT_ATTENTION_CLASSES
from visionft.patching.rows import enable_rows, row_module
from visionft.testing.tiny import TINY_ARCHS, build_tiny_vlm

FAMILY_IDS = [spec.model_types[0] for spec in FAMILIES]


@pytest.mark.parametrize("spec", FAMILIES, ids=FAMILY_IDS)
def test_each_familys_patch_set_and_modeling_modules_import(spec):
    for model_type, modeling in spec.modeling.items():
        assert importlib.import_module(modeling).__name__ == modeling, model_type
    if spec.patches is None:
        assert all(patch_set(t) is None for t in spec.model_types)
        return
    from visionft.patching.kinds import KINDS

    module = importlib.import_module(spec.patches)
    assert module.KINDS and set(module.KINDS) <= set(KINDS), module.KINDS
    for model_type in spec.model_types:
        found = patch_set(model_type)
        assert found is not None and found.args == (tuple(module.KINDS),)
        assert found.keywords["modeling"] == spec.modeling[model_type]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_the_packing_flag_is_what_the_packed_attention_covers(arch):
    model, _ = build_tiny_vlm(arch)
    spec = get_arch_spec(model.config.model_type)
    # The family's own text attention classes, which the packed attention must know.
    covered = any(type(m).__name__ in spec.text_attention for m in model.modules())
    assert set(spec.text_attention) <= set(TEXT_ATTENTION_CLASSES)
    # Qwen3-VL's text attention is covered for its fixed-shape rows only (``rows``), not per-batch packing.
    assert spec.packing <= covered and covered <= (spec.packing or spec.rows is not None)
    packs = spec.packing or spec.rows is not None
    assert (packing_unsupported_reason(model.config.model_type) is None) == packs


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_the_rows_entry_decides_which_families_get_fixed_shape_rows(arch):
    model, _ = build_tiny_vlm(arch)
    model_type = model.config.model_type
    spec = get_arch_spec(model_type)
    options = EngineOptions(packing=True).for_model_type(model_type)
    assert options.rows == (spec.rows is not None)
    assert not EngineOptions(packing=False).for_model_type(model_type).rows
    try:
        if spec.rows is None:
            assert row_module(model_type) is None
            with pytest.raises(ValueError, match=f"model_type={model_type!r}"):
                enable_rows(model, pad_id=0)
            return
        module = row_module(model_type)
        assert module is not None and module.__name__ == spec.rows
        family = enable_rows(model, pad_id=0, fused=False)
        assert isinstance(family, module.FAMILY)
    finally:
        revert_optimizations(model)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_the_graph_step_flag_decides_whether_a_family_takes_graph_steps(arch):
    model, _ = build_tiny_vlm(arch)
    spec = get_arch_spec(model.config.model_type)
    reason = model_reason(model, None) or ""
    if spec.graph_steps:  # refused here only for the device (these tests run on the CPU)
        assert "CUDA graphs need CUDA" in reason or torch.cuda.is_available()
    else:
        assert f"model_type={model.config.model_type!r}" in reason
    assert spec.graph_steps <= (spec.patches is not None)


def _without_rows(monkeypatch, model_type: str = "mllama") -> None:
    """Registers ``model_type``'s family without rows or packing: every real family now has one or both."""
    from visionft.model import architectures

    spec = dataclasses.replace(get_arch_spec(model_type), rows=None, packing=False, text_attention=())
    monkeypatch.setitem(architectures._BY_TYPE, model_type, spec)


def test_packing_refusal_names_the_families_that_pack(monkeypatch):
    _without_rows(monkeypatch)
    reason = packing_unsupported_reason("mllama")
    assert reason is not None
    families = reason.split("packing is supported for ")[1].split(" only, and this model is ")
    assert set(families[0].split(", ")) == {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "gemma3",
        "llava",
        "llava_next",
    }
    assert families[1] == "model_type='mllama'"


def test_a_registered_family_is_seen_by_every_lookup():
    qwen = get_arch_spec("qwen2_vl")
    assert qwen is not None
    family = dataclasses.replace(
        qwen, model_types=("tiny_vlm",), modeling={"tiny_vlm": qwen.modeling["qwen2_vl"]}
    )
    register_arch(family)
    try:
        assert get_arch_spec("tiny_vlm") is family
        assert packing_unsupported_reason("tiny_vlm") is None
        found = patch_set("tiny_vlm")
        assert found is not None and found.keywords["modeling"] == qwen.modeling["qwen2_vl"]
    finally:
        unregister_arch("tiny_vlm")
    assert patch_set("tiny_vlm") is None
    assert "model_type='tiny_vlm'" in (packing_unsupported_reason("tiny_vlm") or "")


def test_a_family_needs_the_modeling_module_of_each_type_its_patch_set_covers():
    parts = dict(
        vision="model.visual",
        language="model.language_model",
        projector=(),
        attention=("attn",),
        mlp=("mlp",),
        keep_16bit=("lm_head",),
    )
    with pytest.raises(ValueError, match=r"needs the modeling module of \['b'\]"):
        ArchSpec(model_types=("a", "b"), patches="visionft.patching.gemma3", modeling={"a": "m"}, **parts)
    with pytest.raises(ValueError, match=r"modeling names \['c'\]"):
        ArchSpec(model_types=("a",), modeling={"c": "m"}, **parts)
    assert ArchSpec(model_types=("a",), **parts).patches is None
