"""Every difference between the supported transformers/peft versions is handled here, and only here.

Supported: transformers 5.17-5.23, peft 0.21.x (the GPU host runs transformers 5.17 / peft 0.21.0,
CI runs 5.23 / 0.21.2). Callers use these helpers instead of testing versions themselves.
"""

from __future__ import annotations

import transformers


def image_processor_class(name: str) -> type:
    """The PIL-backed image processor class ``name``, falling back to the torchvision one.

    transformers 5.23 splits image processors into ``<Name>Pil`` (PIL/numpy) and ``<Name>``
    (torchvision); earlier 5.x releases call the PIL one ``<Name>`` and the torchvision one
    ``<Name>Fast``. The PIL backend is preferred because it needs no torchvision.

    Args:
        name (str): the base class name, e.g. ``"Qwen2VLImageProcessor"``.

    Returns:
        type: the class.
    """
    pil = getattr(transformers, f"{name}Pil", None)
    return pil if pil is not None else getattr(transformers, name)


def image_text_to_text_model_types() -> set[str]:
    """The ``model_type`` values ``AutoModelForImageTextToText`` can build (a stable 5.x mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def enable_activation_checkpointing(model, offload: bool) -> None:
    """Turns on non-reentrant activation checkpointing of ``model``'s repeated blocks.

    transformers 5.23 has ``activation_checkpointing_enable(offload=...)``, which keeps the
    saved block inputs in pinned host memory (``torch.autograd.graph.save_on_cpu`` around each
    checkpointed block). 5.17 has only ``gradient_checkpointing_enable``; there the same wrapper is
    installed as each block's checkpoint function, the attribute transformers itself sets.

    Non-reentrant checkpointing is used because the reentrant kind drops gradients of tensors
    passed as keyword arguments, such as Mllama's ``cross_attention_states`` that carry the vision
    tower's LoRA gradients.

    Args:
        model: a ``PreTrainedModel`` (not a PEFT wrapper).
        offload (bool): hold checkpointed activations on the CPU.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        import functools

        import torch
        from torch.utils.checkpoint import checkpoint

        pin = torch.cuda.is_available()

        def offloaded(function, *args, **kw):
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return checkpoint(function, *args, **kw)

        func = functools.partial(offloaded, use_reentrant=False)
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = func


def disable_activation_checkpointing(model) -> None:
    """Turns activation checkpointing off (either API generation); a no-op when it is off."""
    if not is_checkpointing(model):
        return
    if hasattr(type(model), "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    """Whether activation checkpointing is on."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
