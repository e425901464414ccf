"""training.packing end to end: the collator's packed row (labels at the boundaries, no padding, the
layout keys, the image tensors), `visionft-train` learning with packing on, the refusal for other
architectures before training, and the field in the CRD. Model-level equivalence with padded batches:
tests/patching/test_packed_attention.py."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
import yaml
from visionft.data.collator import IGNORE_INDEX, VisionDataCollator
from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN
from visionft.job.cli import EXIT_CONFIG, main
from visionft.patching import enable_packing, revert_optimizations
from visionft.testing.tiny import build_tiny_vlm
from visionft_api import crd

from tests.patching.test_packed_attention import _samples
from tests.trainer.job.test_cli import config, progress_lines


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_packed_row_is_the_padded_batch_without_padding(arch):
    model, processor = build_tiny_vlm(arch)
    enable_packing(model)
    samples = _samples()
    padded = VisionDataCollator(model, processor)(samples)
    packed = VisionDataCollator(model, processor, packing=True)(samples)
    lengths = padded["attention_mask"].sum(1).tolist()
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    assert set(packed) == set(padded) | {PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN}
    cu = packed[PACKED_CU_SEQLENS]
    assert cu.dtype == torch.int32 and cu.tolist() == starts
    assert packed[PACKED_MAX_SEQLEN] == max(lengths) and isinstance(packed[PACKED_MAX_SEQLEN], int)
    # One row, no padding token anywhere, every position attended.
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert torch.equal(packed["attention_mask"], torch.ones(1, sum(lengths), dtype=torch.long))
    for row, (a, b) in enumerate(itertools.pairwise(starts)):
        n = b - a
        for key in ("input_ids", "mm_token_type_ids"):
            assert torch.equal(packed[key][0, a:b], padded[key][row, :n]), key
        want = padded["labels"][row, :n].clone()
        if row > 0:
            want[0] = IGNORE_INDEX  # would be predicted from the previous sample's last token
        assert torch.equal(packed["labels"][0, a:b], want)
    # Per-image tensors: all images, in order, exactly as in the padded batch.
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    assert packed["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 8, 6]]


def test_visionft_train_learns_with_packing_as_with_padded_batches(tmp_path, tiny_dir, capsys, caplog):
    # perDeviceBatchSize 4: each step trains one packed row of four samples (optimizations off here).
    curves = {}
    for packing in (False, True):
        folder = tmp_path / f"packing-{packing}"
        folder.mkdir()
        path = config(folder, tiny_dir, packing=packing)
        with caplog.at_level(logging.INFO, logger="visionft.patching"):
            assert main(["--config", str(path)]) == 0
        lines = progress_lines(capsys.readouterr().out)
        assert [r["step"] for r in lines] == [4, 8, 12, 16, 20]
        curves[packing] = [r["loss"] for r in lines]
        rows = json.loads((folder / "out" / "run.json").read_text())["rows"]
        # Packing trains on fixed-shape rows; these samples are all of one size, so each row holds
        # exactly its step's batch of four and the curves must agree.
        assert (rows is not None) == packing and (not packing or rows["samples_per_row"] == 4.0)
    padded, packed = curves[False], curves[True]
    print(f"loss every 4 steps, padded {padded}, packed {packed}")
    assert packed[-1] < 0.5 * packed[0], packed  # it learns
    assert packed == pytest.approx(padded, rel=1e-3)  # as the padded batches do


def test_the_collator_refuses_a_model_whose_attention_would_mix_the_samples():
    model, processor = build_tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError, match=r"training\.packing.*see the samples before it.*enable_packing"):
        VisionDataCollator(model, processor, packing=True)
    enable_packing(model)
    VisionDataCollator(model, processor, packing=True)
    revert_optimizations(model)
    with pytest.raises(ValueError, match="enable_packing"):
        VisionDataCollator(model, processor, packing=True)


def test_packing_for_another_architecture_stops_before_training(tmp_path, tiny_dir, capsys, monkeypatch):
    import dataclasses

    from visionft.model import architectures

    # Every real family packs now: Mllama registered as one that neither packs nor has rows.
    plain = dataclasses.replace(architectures.get_arch_spec("mllama"), rows=None, packing=False)
    monkeypatch.setitem(architectures._BY_TYPE, "mllama", plain)
    path = config(tmp_path, tiny_dir, packing=True)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["uri"] = str(tiny_dir("mllama"))
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == EXIT_CONFIG
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("visionft-train: error: training.packing:")
    families = last.split("packing is supported for ")[1].split(" only, and this model is ")
    assert set(families[0].split(", ")) == {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "gemma3",
        "llava",
        "llava_next",
    }
    assert families[1].startswith("model_type='mllama'")
    assert "set training.packing to false" in last
    assert "evaluation of the base model" not in captured.out
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_crd_documents_packing():
    training = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["training"]["properties"]
    assert training["packing"]["type"] == "boolean" and training["packing"]["default"] is False
    description = training["packing"]["description"]
    assert description.startswith("packing ") and "Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Gemma 3" in description
