"""The trainer config the job tests share: the tiny Qwen2-VL on a local shapes dataset, a few CPU steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_recipe(
    model: Path, data: Path, tmp_path: Path, max_steps: int = 4, **sections: Any
) -> dict[str, Any]:
    """A trainer config (camelCase dict): LoRA r 8, batch 4, plain modules, output and work folder in
    ``tmp_path``; ``sections`` replace or add top-level sections (``evaluation``, ``tracking``...)."""
    raw: dict[str, Any] = {
        "model": {"uri": str(model), "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 8, "alpha": 8},
        "dataset": {"uri": str(data), "format": "auto"},
        "training": {
            "maxSteps": max_steps,
            "perDeviceBatchSize": 4,
            "learningRate": 5e-3,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 100,
            "keepCheckpoints": 1,
            "loggingSteps": 2,
            "optimizations": False,
        },
        "output": {"uri": str(tmp_path / "out")},
        "runtime": {"workDir": str(tmp_path / "work")},
    }
    raw.update(sections)
    return raw
