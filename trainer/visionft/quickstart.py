"""Assets of the local quickstart, made on first use: the shapes dataset and a tiny random-weight VLM.

``runtime.prepareQuickstart: true`` in a trainer config (``examples/quickstart.yaml``) makes the CLI call
``prepare`` before anything else, so that one command on a fresh checkout does the whole job. Both steps
are skipped when their folder already holds the result, so a second run reuses them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from visionft.data.synthetic import make_shapes_dataset

logger = logging.getLogger(__name__)

# The Qwen2-VL family is the one the design centres on; its tiny stand-in learns the colour task in
# about 100 LoRA steps on 2 CPU cores.
QUICKSTART_ARCH = "qwen2_vl"


def prepare(dataset_dir: str | Path, model_dir: str | Path, arch: str = QUICKSTART_ARCH) -> None:
    """Writes the shapes dataset to ``dataset_dir`` and a tiny ``arch`` model to ``model_dir`` if missing.

    Args:
        dataset_dir (str | Path): the dataset folder (an imagefolder with train/ and test/).
        model_dir (str | Path): the model folder (config, weights, processor).
        arch (str): a ``visionft.testing.tiny.TINY_ARCHS`` name. Default: ``"qwen2_vl"``.
    """
    dataset_dir, model_dir = Path(dataset_dir), Path(model_dir)
    if not (dataset_dir / "train" / "metadata.jsonl").is_file():
        logger.info("visionft: generating the shapes dataset in %s", dataset_dir)
        make_shapes_dataset(dataset_dir, train_size=400, test_size=100, image_size=56, task="colour", seed=0)
    if not (model_dir / "config.json").is_file():
        from visionft.testing.tiny import save_tiny_vlm

        logger.info("visionft: saving a tiny random-weight %s model to %s", arch, model_dir)
        save_tiny_vlm(arch, model_dir, seed=0)
