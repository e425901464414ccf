"""The small LoRA the patching tests put on tiny models."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


def tiny_lora(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """``model`` with LoRA r=4, alpha=8, no dropout on every linear layer, and non-zero B matrices.

    PEFT starts B at zero, so the adapters would change neither the outputs nor A's gradients; the
    B matrices are drawn from N(0, 0.05^2) instead, so a patched LoRA path that is wrong shows up.

    Args:
        model (nn.Module): the base model.
        generator (torch.Generator | None): a CPU generator for the B draws; None draws with the
            global RNG of each parameter's device (``nn.init.normal_``). Default: None.
    """
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    for name, param in model.named_parameters():
        if "lora_B" not in name:
            continue
        if generator is None:
            nn.init.normal_(param, std=0.05)
        else:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


__all__ = ["tiny_lora"]
