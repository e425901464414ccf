"""``FastVisionModel``: the user-facing entry points, in the shape of Unsloth's vision API.

Each method delegates to one module: loading (``visionft.model.loading``), LoRA (``visionft.model.lora``),
saving (``visionft.model.saving``, bound onto the returned PeftModel). The class only groups them so
that code written for Unsloth runs after changing its import.
"""

from __future__ import annotations

from torch import nn

from visionft.model import loading, lora


def _configs(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return []
    subs = [getattr(config, name, None) for name in ("text_config", "language_config")]
    return [config, *[c for c in subs if c is not None]]


class FastVisionModel:
    """Load, adapt, train and save VLMs with QLoRA."""

    # The two entry points are the modules' own functions, so signatures and docs live in one place.
    from_pretrained = staticmethod(loading.from_pretrained)
    get_peft_model = staticmethod(lora.get_peft_model)

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool = True) -> nn.Module:
        """Puts ``model`` in training mode: ``train()``, KV cache off, checkpointing as configured.

        Args:
            model: the model (PEFT-wrapped or not).
            use_gradient_checkpointing (bool): False turns activation checkpointing off; True
                keeps whatever ``get_peft_model`` set. Default: True.

        Returns:
            nn.Module: ``model``.
        """
        from visionft.model.compat import disable_activation_checkpointing

        model.train()
        for config in _configs(model):
            config.use_cache = False
        if not use_gradient_checkpointing:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            disable_activation_checkpointing(base)
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Puts ``model`` in inference mode: ``eval()`` (which also skips checkpointing) and KV cache on.

        Returns:
            nn.Module: ``model``.
        """
        model.eval()
        for config in _configs(model):
            config.use_cache = True
        return model
