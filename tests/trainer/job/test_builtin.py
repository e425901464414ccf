"""Generated sources (visionft.job.builtin): the schema's closed builtin:// set is exactly what the trainer can
generate; each is made once, whole, in the work folder, and reused."""

from __future__ import annotations

import pytest
from visionft.data.formats import load_local_dataset
from visionft.job import builtin
from visionft_api.recipe import BUILTIN_DATASETS, BUILTIN_HELD_OUT, BUILTIN_MODELS


def test_the_schema_names_exactly_the_generators() -> None:
    assert set(builtin.GENERATORS) == {*BUILTIN_MODELS, *BUILTIN_DATASETS}


def test_shapes_are_generated_once_and_reused(tmp_path) -> None:
    root = tmp_path / "builtin"
    folder = builtin.materialize("builtin://shapes", root)
    assert folder == root / "shapes"
    splits = load_local_dataset(folder)
    assert (len(splits["train"]), len(splits["test"])) == (400, 100)
    assert {row["response"] for row in splits["test"]} == {"red", "green", "blue", "yellow"}
    marker = folder / "train" / "metadata.jsonl"
    before = marker.stat().st_mtime_ns
    assert builtin.materialize("builtin://shapes", root) == folder
    assert marker.stat().st_mtime_ns == before  # reused, not regenerated
    assert [p.name for p in root.iterdir()] == ["shapes"]  # no partial folder left behind


def test_each_generated_dataset_holds_the_held_out_split_the_schema_checks_against(tmp_path) -> None:
    # The admission rules compare evaluation.samples with BUILTIN_HELD_OUT: the sizes must be the real ones.
    for uri, held_out in BUILTIN_HELD_OUT.items():
        splits = load_local_dataset(builtin.materialize(uri, tmp_path / "builtin"))
        assert sorted(splits) == ["test", "train"] and len(splits["test"]) == held_out, uri


def test_shape_captions_name_colour_and_shape(tmp_path) -> None:
    splits = load_local_dataset(builtin.materialize("builtin://shape-captions", tmp_path))
    assert len(splits["train"]) == 600
    answers = {row["response"] for row in splits["test"]}
    assert len(answers) == 12  # 4 colours x 3 shapes, balanced
    assert all(row["response"] == f"{row['colour']} {row['shape']}" for row in splits["test"])


def test_the_tiny_model_is_a_loadable_model_folder(tmp_path) -> None:
    from transformers import AutoConfig

    folder = builtin.materialize("builtin://tiny-qwen2-vl", tmp_path)
    assert AutoConfig.from_pretrained(folder).model_type == "qwen2_vl"


def test_an_unknown_name_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(
        ValueError,
        match="builtin://tiny-qwen2-vl, builtin://shapes, builtin://shapes-preference, builtin://shape-captions",
    ):
        builtin.materialize("builtin://mnist", tmp_path)
