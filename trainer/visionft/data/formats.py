"""Dataset helpers: load a local dataset folder or file through ``datasets``, split it, and map the
recipe's columns to chat messages.

Formats (``DatasetSource.format``; ``auto`` detects them in this order):

- ``arrow``: a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder (``state.json`` or
  ``dataset_dict.json`` at its top);
- ``imagefolder``: a folder with ``metadata.jsonl`` (at the top or in split folders such as ``train/``),
  whose ``file_name`` column names the image files next to it;
- ``jsonl``, ``json``, ``parquet``: one file, or a folder of such files. In a folder, ``datasets`` maps
  file names to splits (``train*``, ``test*``, ``validation*``...); files with other names form ``train``.

Images stay undecoded (``datasets.Image(decode=False)``), so that every image, whatever the format, goes
through ``visionft.data.images`` with its size limits and path rules when a batch is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionft.data.errors import BadSampleError

FORMATS = ("jsonl", "json", "parquet", "arrow", "imagefolder")
_EXTENSIONS = {"jsonl": (".jsonl",), "json": (".json",), "parquet": (".parquet",)}


def detect_format(path: str | Path) -> str:
    """The format of the dataset at ``path`` (see the module docstring for the order of checks).

    Raises:
        ValueError: ``path`` does not exist or holds nothing recognisable.
    """
    path = Path(path)
    if path.is_file():
        for fmt, exts in _EXTENSIONS.items():
            if path.name.endswith(exts):
                return fmt
        raise ValueError(f"dataset file {path} is not .jsonl, .json or .parquet; set dataset.format")
    if not path.is_dir():
        raise ValueError(f"dataset {path} does not exist; check dataset.uri")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "arrow"
    if (path / "metadata.jsonl").is_file() or any(path.glob("*/metadata.jsonl")):
        return "imagefolder"
    files = [p for p in path.rglob("*") if p.is_file()]
    for fmt, exts in _EXTENSIONS.items():
        if any(p.name.endswith(exts) for p in files):
            return fmt
    raise ValueError(
        f"dataset folder {path} holds no metadata.jsonl, .jsonl, .json, .parquet or save_to_disk files; "
        "check dataset.uri or set dataset.format"
    )


def load_local_dataset(path: str | Path, fmt: str = "auto"):
    """Loads the dataset at ``path`` as a ``datasets.DatasetDict`` (a single split is called ``train``).

    Image columns are cast to undecoded form (``{"bytes", "path"}`` dicts).

    Args:
        path (str | Path): a local folder or file.
        fmt (str): one of ``FORMATS`` or ``"auto"``. Default: ``"auto"``.

    Raises:
        ValueError: the format is unknown or the files cannot be read as that format.
    """
    import datasets

    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"dataset.format={fmt!r} is not one of {['auto', *FORMATS]}")
    try:
        if fmt == "arrow":
            loaded = datasets.load_from_disk(str(path))
        elif fmt == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            builder = "json" if fmt in ("json", "jsonl") else "parquet"
            if path.is_file():
                loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
            else:
                loaded = datasets.load_dataset(builder, data_dir=str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise ValueError(f"dataset {path} could not be read as {fmt}: {err}") from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return datasets.DatasetDict({name: _undecoded_images(split) for name, split in loaded.items()})


def _undecoded_images(dataset):
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Sequence | list) and _is_image(feature):
            dataset = dataset.cast_column(name, datasets.Sequence(datasets.Image(decode=False)))
    return dataset


def _is_image(feature: Any) -> bool:
    import datasets

    inner = getattr(feature, "feature", None) or (
        feature[0] if isinstance(feature, list) and feature else None
    )
    return isinstance(inner, datasets.Image)


def split_validation(dataset_dict, fraction: float, seed: int):
    """Returns ``(train, validation)``: an existing ``validation`` (or ``test``) split is used as is;
    otherwise ``fraction`` of ``train`` is held out; ``fraction == 0`` gives no validation split.

    Raises:
        ValueError: there is no ``train`` split, or holding out would leave ``train`` empty.
    """
    if "train" not in dataset_dict:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(dataset_dict)}); name one train")
    train = dataset_dict["train"]
    for name in ("validation", "test"):
        if name in dataset_dict:
            return train, dataset_dict[name]
    if fraction <= 0:
        return train, None
    held = max(1, round(len(train) * fraction))
    if held >= len(train):
        raise ValueError(f"validationFraction={fraction} of {len(train)} samples leaves nothing to train on")
    parts = train.train_test_split(test_size=held, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def to_messages(sample: dict, columns: Any = None, instruction: str | None = None) -> dict:
    """Maps one record to the collator's ``{"messages": ..., "images": ...}`` form.

    With ``columns.messages`` set, that column is the conversation (and ``columns.images``, when set, its
    images). Otherwise the record is the seed's single turn: the ``columns.image`` image, the
    ``columns.instruction`` text (or ``instruction`` for every sample when the column is absent or empty)
    as the user turn, and ``columns.response`` as the assistant turn.

    Args:
        sample (dict): one dataset record.
        columns: a ``visionft_api.recipe.DatasetColumns`` or a dict with the same keys. Default: the
            schema's defaults (image, instruction, response).
        instruction (str | None): the prompt used when the sample has none.

    Raises:
        BadSampleError: a named column is missing or empty.
    """
    cols = _columns(columns)
    if cols["messages"]:
        if sample.get(cols["messages"]) is None:
            raise BadSampleError(f"column {cols['messages']!r} is missing or empty", field=cols["messages"])
        out = {"messages": sample[cols["messages"]]}
        if cols["images"] and sample.get(cols["images"]) is not None:
            out["images"] = sample[cols["images"]]
        return out
    image = sample.get(cols["image"]) if cols["image"] else None
    prompt = sample.get(cols["instruction"]) if cols["instruction"] else None
    prompt = prompt if prompt not in (None, "") else instruction
    if prompt is None:
        raise BadSampleError(
            f"no instruction: column {cols['instruction']!r} is missing or empty and dataset.instruction is "
            "not set; set one of them",
            field=str(cols["instruction"]),
        )
    response = sample.get(cols["response"])
    if response is None:
        raise BadSampleError(f"column {cols['response']!r} is missing or empty", field=cols["response"])
    user: list[dict] = [{"type": "text", "text": str(prompt)}]
    if image is not None:
        user.insert(0, {"type": "image", "image": image})
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": _answer_text(response)}]},
        ]
    }


def _answer_text(response: Any) -> str:
    """The assistant's text for a response value: a JSON object or list (a structured answer in JSONL or a
    parquet struct) as JSON, so that the model learns, and the JSON metrics read, JSON and not Python's
    repr of it."""
    if isinstance(response, dict | list):
        return json.dumps(response, ensure_ascii=False)
    return str(response)


def _columns(columns: Any) -> dict[str, str | None]:
    defaults = {
        "messages": None,
        "image": "image",
        "images": None,
        "instruction": "instruction",
        "response": "response",
        "chosen": None,
        "rejected": None,
    }
    if columns is None:
        return defaults
    if isinstance(columns, dict):
        return {**defaults, **columns}
    return {key: getattr(columns, key) for key in defaults}


class MessagesFormatter:
    """``to_messages`` bound to a recipe's columns and instruction: a picklable collator ``formatter``."""

    def __init__(self, columns: Any = None, instruction: str | None = None):
        self.columns = columns
        self.instruction = instruction

    def __call__(self, sample: dict) -> dict:
        return to_messages(sample, self.columns, self.instruction)
