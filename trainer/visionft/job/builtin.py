"""Generated sources: ``builtin://`` models and datasets, made in the work folder instead of being read.

A recipe whose ``model.uri`` or ``dataset.uri`` is ``builtin://NAME`` (``visionft_api.recipe.BUILTIN_MODELS``,
``BUILTIN_DATASETS``) needs no bucket, download or GPU: the quickstart (``examples/quickstart.yaml``) runs
on a laptop with ``visionft-train`` and, unchanged, as a CPU pod that smoke-tests a cluster install.

Each source is generated once into ``<workDir>/builtin/<NAME>/`` and reused by later runs with the same
work folder. It is written into a temporary sibling folder and renamed into place when complete, so a
folder under that name is always whole: an interrupted run leaves no half-written model or dataset behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from visionft_api.recipe import BUILTIN_SCHEME

from visionft.data.synthetic import make_shapes_dataset, make_shapes_preference_dataset

logger = logging.getLogger(__name__)


def _tiny_qwen2_vl(folder: Path) -> None:
    # The Qwen2-VL family is the one the design centres on; its tiny stand-in learns the shapes task in
    # about 100 LoRA steps on 2 CPU cores.
    from visionft.testing.tiny import save_tiny_vlm

    save_tiny_vlm("qwen2_vl", folder, seed=0)


def _shapes(folder: Path) -> None:
    # Four colours, so chance is 25%; 56 x 56 pixels is 2 x 2 patches of Qwen2-VL's 28-pixel merge.
    make_shapes_dataset(folder, train_size=400, test_size=100, image_size=56, task="colour", seed=0)


def _shapes_preference(folder: Path) -> None:
    # The same images as builtin://shapes, each with its colour chosen over a wrong one: chance is 50%.
    make_shapes_preference_dataset(folder, train_size=400, test_size=100, image_size=56, seed=0)


def _shape_captions(folder: Path) -> None:
    # The harder task: colour and shape in two words, scored by the character error rate; 600 training
    # images, since the shape takes the tiny model many more steps than the colour.
    make_shapes_dataset(folder, train_size=600, test_size=100, image_size=56, task="caption", seed=1)


#: Each builtin URI and the function that writes it into a folder; the keys are the schema's
#: ``BUILTIN_MODELS`` and ``BUILTIN_DATASETS``, and each dataset's test split holds the schema's
#: ``BUILTIN_HELD_OUT`` samples (tests/trainer/job/test_builtin.py checks both).
GENERATORS: dict[str, Callable[[Path], None]] = {
    "builtin://tiny-qwen2-vl": _tiny_qwen2_vl,
    "builtin://shapes": _shapes,
    "builtin://shapes-preference": _shapes_preference,
    "builtin://shape-captions": _shape_captions,
}


def materialize(uri: str, root: str | Path) -> Path:
    """The local folder of the generated source ``uri``, generating it on first use.

    Args:
        uri (str): a ``builtin://NAME`` URI of ``GENERATORS``.
        root (str | Path): where generated sources live (``<workDir>/builtin``).

    Returns:
        Path: ``<root>/<NAME>``, complete.

    Raises:
        ValueError: ``uri`` names no generated source (the schema rejects these before).
    """
    generate = GENERATORS.get(uri)
    if generate is None:
        raise ValueError(f"{uri} is not a generated source; the builtin ones are {', '.join(GENERATORS)}")
    target = Path(root) / uri.removeprefix(BUILTIN_SCHEME)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("generating %s in %s", uri, target)
    generate(partial)
    partial.rename(target)
    return target
