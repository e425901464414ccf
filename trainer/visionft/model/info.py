"""What ``FastVisionModel.from_pretrained`` recorded about a model, kept on the model itself.

Saving needs it later (the source folder, the 16-bit skip list for re-quantizing, the processor),
and the data collator may read ``max_seq_length`` from it. It is a plain attribute
(``model.visionft_info``), so it survives PEFT wrapping (PEFT forwards unknown attributes to the
base model) and costs nothing when absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ATTRIBUTE = "visionft_info"


@dataclass
class LoadInfo:
    """How a model was loaded.

    Attributes:
        source (str): the folder or hub id it was loaded from.
        model_type (str): ``config.model_type``.
        max_seq_length (int): the longest sequence the user means to train on.
        dtype (torch.dtype): the dtype of unquantized weights / the compute dtype.
        quantization (str | None): "4bit", "8bit" or None.
        pre_quantized (bool): the checkpoint itself was quantized (it had a quantization_config).
        keep_16bit (list[str]): modules kept out of quantization.
        processor (Any): the processor loaded alongside, saved with adapters.
    """

    source: str
    model_type: str
    max_seq_length: int
    dtype: torch.dtype
    quantization: str | None = None
    pre_quantized: bool = False
    keep_16bit: list[str] = field(default_factory=list)
    processor: Any = None


def get_load_info(model) -> LoadInfo | None:
    """The ``LoadInfo`` of ``model`` (a transformers model or a PEFT wrapper of one), or None."""
    return getattr(model, ATTRIBUTE, None)


def set_load_info(model, info: LoadInfo) -> None:
    """Attaches ``info`` to ``model``."""
    setattr(model, ATTRIBUTE, info)
