"""Dataset formats: each one is detected, loads through ``datasets`` and feeds the collator; the seed's
columns map to messages; validation splits follow validationFraction."""

from __future__ import annotations

import json

import datasets
import pytest
from visionft.data.collator import VisionDataCollator
from visionft.data.errors import BadSampleError
from visionft.data.formats import (
    MessagesFormatter,
    detect_format,
    load_local_dataset,
    split_validation,
    to_messages,
)
from visionft.data.synthetic import COLOURS, make_shapes_dataset
from visionft.testing.tiny import build_tiny_vlm

from .test_images import png_bytes

ROWS = [
    {"image": f"img/{i}.png", "instruction": "What colour?", "response": c}
    for i, c in enumerate(["red", "green", "blue", "yellow"])
]


def write_images(root):
    (root / "img").mkdir(parents=True)
    for i, colour in enumerate(COLOURS.values()):
        (root / "img" / f"{i}.png").write_bytes(png_bytes((56, 56), colour))


def make(fmt, root):
    """Writes ROWS in ``fmt`` under ``root``; returns the path to pass as dataset.uri."""
    write_images(root)
    if fmt == "jsonl":
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        (root / "train.json").write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(root / "train.parquet"))
    elif fmt.startswith("arrow"):
        # save_to_disk folders usually embed the images: an Image feature holding the bytes.
        embedded = [{**r, "image": (root / r["image"]).read_bytes()} for r in ROWS]
        ds = datasets.Dataset.from_list(embedded).cast_column("image", datasets.Image())
        (ds if fmt == "arrow-single" else datasets.DatasetDict({"train": ds})).save_to_disk(
            str(root / "saved")
        )
        return root / "saved"
    elif fmt == "imagefolder":
        meta = [
            {"file_name": f"{i}.png", "instruction": r["instruction"], "response": r["response"]}
            for i, r in enumerate(ROWS)
        ]
        (root / "img" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
        return root / "img"
    return root


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "arrow-single", "imagefolder"])
def test_each_format_is_detected_loads_and_collates(tmp_path, fmt):
    path = make(fmt, tmp_path)
    assert detect_format(path) == fmt.split("-")[0]
    splits = load_local_dataset(path)
    assert list(splits) == ["train"] and len(splits["train"]) == 4
    assert sorted(splits["train"]["response"]) == sorted(r["response"] for r in ROWS)
    if fmt in ("imagefolder", "arrow", "arrow-single"):
        # Images stay undecoded, so the collator's loader applies its limits to them.
        assert isinstance(splits["train"][0]["image"], dict)
    model, processor = build_tiny_vlm("qwen2_vl")
    root = path if path.is_dir() else path.parent
    collator = VisionDataCollator(
        model, processor, dataset_root=root if fmt != "imagefolder" else path, formatter=MessagesFormatter()
    )
    batch = collator([splits["train"][i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4


def test_a_single_file_loads_as_train(tmp_path):
    make("jsonl", tmp_path)
    assert len(load_local_dataset(tmp_path / "train.jsonl", "jsonl")["train"]) == 4


def test_split_files_and_validation(tmp_path):
    out = make_shapes_dataset(tmp_path / "shapes", train_size=20, test_size=8, image_size=28)
    splits = load_local_dataset(out)
    assert sorted(splits) == ["test", "train"]
    train, held = split_validation(splits, 0.2, seed=1)
    assert (len(train), len(held)) == (20, 8)  # an existing test split wins over the fraction
    only_train = datasets.DatasetDict({"train": splits["train"]})
    train, held = split_validation(only_train, 0.25, seed=1)
    assert (len(train), len(held)) == (15, 5)
    assert split_validation(only_train, 0.0, seed=1)[1] is None
    # The synthetic split is balanced over the four colours.
    assert sorted(splits["train"]["response"]) == sorted(list(COLOURS) * 5)


def test_unknown_or_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="holds no metadata"):
        detect_format(tmp_path)


def test_to_messages_from_seed_columns_and_fallback_instruction():
    out = to_messages({"image": "a.png", "instruction": "", "response": "red"}, None, "Name the colour.")
    assert out["messages"][0]["content"] == [
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": "Name the colour."},
    ]
    assert out["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    custom = to_messages(
        {"pic": "b.png", "q": "Which?", "a": "blue"}, {"image": "pic", "instruction": "q", "response": "a"}
    )
    assert custom["messages"][0]["content"][0]["image"] == "b.png"
    passthrough = to_messages(
        {"conv": [{"role": "user", "content": "x"}], "imgs": ["c.png"]},
        {"messages": "conv", "images": "imgs"},
    )
    assert passthrough == {"messages": [{"role": "user", "content": "x"}], "images": ["c.png"]}
    structured = to_messages({"image": "a.png", "instruction": "q", "response": {"total": "12.50", "n": [1]}})
    assert structured["messages"][1]["content"][0]["text"] == '{"total": "12.50", "n": [1]}'
    with pytest.raises(BadSampleError, match="no instruction"):
        to_messages({"image": "a.png", "response": "red"})
    with pytest.raises(BadSampleError, match="'response' is missing"):
        to_messages({"image": "a.png", "instruction": "q"})
