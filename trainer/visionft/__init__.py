"""VisionFT trainer: QLoRA fine-tuning of vision-language models.

``from visionft import FastVisionModel, VisionDataCollator``. Both names resolve lazily, so
``import visionft`` stays cheap (no torch/transformers import until one of them is used), and the
package imports even where an optional part is missing.

Test helpers: ``visionft.testing.tiny`` builds tiny offline VLMs and processors for every
supported architecture.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FastVisionModel", "VisionDataCollator"]

_LAZY = {
    "FastVisionModel": "visionft.model.fast_vision_model",
    "VisionDataCollator": "visionft.data.collator",
}

if TYPE_CHECKING:  # pragma: no cover
    from visionft.data.collator import VisionDataCollator
    from visionft.model.fast_vision_model import FastVisionModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'visionft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
