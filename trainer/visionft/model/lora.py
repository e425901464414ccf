"""``FastVisionModel.get_peft_model``: choose the LoRA targets from the architecture map and wrap.

Selection runs in three steps. 1) Every Linear is put in a group (``visionft.model.classify``):
vision/language x attention/MLP, or "other" (projector, lm_head). 2) The four ``finetune_*``
switches keep the groups they name. 3) ``target_modules`` filters further: ``"all-linear"`` keeps
all, a list keeps modules whose name equals or ends with an entry, a string is a regex matched
against the full name. Modules in "other" are adapted only when a list or regex names them, so
``lm_head`` and the projector are never adapted unless asked. The chosen full names go to PEFT as
an explicit list, so the saved adapter_config.json reproduces the same set under plain PEFT.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model

from visionft.model.classify import Group, classify_linear_modules, classify_name, count_groups, spec_for
from visionft.model.compat import disable_activation_checkpointing, enable_activation_checkpointing

logger = logging.getLogger(__name__)


def _wanted_groups(vision: bool, language: bool, attention: bool, mlp: bool) -> set[Group]:
    if not (vision or language):
        raise ValueError(
            "finetune_vision_layers=False and finetune_language_layers=False leave nothing to train; "
            "set at least one of them to True"
        )
    if not (attention or mlp):
        raise ValueError(
            "finetune_attention_modules=False and finetune_mlp_modules=False leave nothing to train; "
            "set at least one of them to True"
        )
    sides = [s for s, on in (("vision", vision), ("language", language)) if on]
    kinds = [k for k, on in (("attn", attention), ("mlp", mlp)) if on]
    return {Group(f"{s}-{k}") for s in sides for k in kinds}


def _matcher(target_modules: str | Sequence[str]):
    """A predicate on full module names, and whether it names modules explicitly."""
    if target_modules == "all-linear":
        return (lambda name: True), False
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"target_modules={target_modules!r} is neither 'all-linear' nor a valid regex: {err}"
            ) from err
        return (lambda name: pattern.fullmatch(name) is not None), True
    if (
        isinstance(target_modules, Sequence)
        and target_modules
        and all(isinstance(t, str) for t in target_modules)
    ):
        entries = tuple(target_modules)
        return (lambda name: any(name == t or name.endswith("." + t) for t in entries)), True
    raise ValueError(
        f"target_modules={target_modules!r} must be 'all-linear', a non-empty list of module names, or a regex string"
    )


def select_lora_targets(
    model,
    target_modules: str | Sequence[str] = "all-linear",
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
) -> dict[str, Group]:
    """The modules to adapt, with their groups (see the module docstring for the rules).

    Raises:
        ValueError: all of vision/language or of attention/MLP are off, ``target_modules`` is
            malformed, or nothing matches.
    """
    wanted = _wanted_groups(
        finetune_vision_layers, finetune_language_layers, finetune_attention_modules, finetune_mlp_modules
    )
    matches, explicit = _matcher(target_modules)
    groups = classify_linear_modules(model)
    selected = {
        name: group
        for name, group in groups.items()
        if matches(name) and (group in wanted or (explicit and group == Group.OTHER))
    }
    if not selected:
        raise ValueError(
            f"no Linear module matches target_modules={target_modules!r} with finetune_vision_layers="
            f"{finetune_vision_layers}, finetune_language_layers={finetune_language_layers}, "
            f"finetune_attention_modules={finetune_attention_modules}, finetune_mlp_modules={finetune_mlp_modules}; "
            f"the model's Linear modules per group: {count_groups(groups)}"
        )
    return selected


def _is_quantized(model) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model.config, "quantization_config", None) is not None
    )


def get_peft_model(
    model,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    target_modules: str | Sequence[str] = "all-linear",
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    use_gradient_checkpointing: bool | str = True,
    random_state: int = 3407,
    init_lora_weights: bool | str = True,
    **lora_kwargs,
) -> PeftModel:
    """Adds LoRA adapters chosen from the architecture map.

    Linear modules are grouped into vision/language x attention/MLP from the per-architecture
    map (a keyword fallback, logged, covers unmapped architectures); the ``finetune_*``
    switches pick groups and ``target_modules`` filters them. The projector/merger,
    ``lm_head`` and embeddings are adapted only when ``target_modules`` names them (or train
    fully through ``modules_to_save``). A summary of adapted modules per group and the
    trainable-parameter count are logged at INFO.

    The returned PeftModel has ``save_pretrained(dir, processor=None)`` (adapters in PEFT
    format plus the processor) and ``save_pretrained_merged(dir, processor=None,
    save_method="merged_16bit"|"merged_4bit"|"lora", max_shard_size="5GB")``.

    Args:
        model: the model from ``from_pretrained``.
        r (int): LoRA rank. Default: 16.
        lora_alpha (int): LoRA scaling numerator. Default: 16.
        lora_dropout (float): dropout on the LoRA input. Default: 0.0.
        bias (str): "none", "all" or "lora_only". Default: "none".
        target_modules (str | Sequence[str]): "all-linear"; a list of module names (a module
            matches an entry it equals or ends with, e.g. "q_proj"); or a regex string
            matched against full module names. Default: "all-linear".
        finetune_vision_layers (bool): adapt the vision tower. Default: True.
        finetune_language_layers (bool): adapt the language model. Default: True.
        finetune_attention_modules (bool): adapt attention projections. Default: True.
        finetune_mlp_modules (bool): adapt MLP projections. Default: True.
        use_rslora (bool): rank-stabilised scaling alpha/sqrt(r). Default: False.
        modules_to_save (Sequence[str] | None): modules trained in full and saved with the
            adapters (e.g. ["lm_head"]). Default: None.
        use_gradient_checkpointing (bool | str): True, False, or "offload" (checkpointed
            activations held in CPU memory; "unsloth" is an alias). Default: True.
        random_state (int): seeds the LoRA initialisation. Default: 3407.
        init_lora_weights (bool | str): passed to ``peft.LoraConfig``. Default: True.
        **lora_kwargs: passed to ``peft.LoraConfig``.

    Returns:
        peft.PeftModel: the wrapped model.

    Raises:
        ValueError: both vision and language off, or both attention and MLP off (the message
            names the switches); malformed ``target_modules``; nothing matched; the model
            already has adapters.
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "model already has LoRA adapters; pass the model from FastVisionModel.from_pretrained"
        )
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} must be a positive integer (the LoRA rank)")
    if use_gradient_checkpointing not in (True, False, "offload", "unsloth"):
        raise ValueError(
            f"use_gradient_checkpointing={use_gradient_checkpointing!r} must be True, False or 'offload'"
        )
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r} must be 'none', 'all' or 'lora_only'")

    selected = select_lora_targets(
        model,
        target_modules,
        finetune_vision_layers,
        finetune_language_layers,
        finetune_attention_modules,
        finetune_mlp_modules,
    )
    quantized = _is_quantized(model)
    # Freeze the base. Unlike peft.prepare_model_for_kbit_training we do not upcast the 16-bit
    # parts (vision tower, embeddings) to fp32: that doubles their memory, and the norms already
    # compute in fp32 internally. LoRA weights themselves are kept in fp32 by PEFT.
    for param in model.parameters():
        param.requires_grad_(False)

    torch.manual_seed(random_state)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        target_modules=list(selected),
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        init_lora_weights=init_lora_weights,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = peft_get_peft_model(model, config)

    if use_gradient_checkpointing:
        # "unsloth" is accepted as an alias so Unsloth notebooks run unchanged.
        offload = use_gradient_checkpointing in ("offload", "unsloth")
        enable_activation_checkpointing(model, offload=offload)
        model.config.use_cache = False
    else:
        disable_activation_checkpointing(model)

    _log_summary(peft_model, selected, quantized)
    _attach_methods(peft_model)
    return peft_model


def _log_summary(peft_model: PeftModel, selected: dict[str, Group], quantized: bool) -> None:
    counts = count_groups(selected)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA on %d modules (%s)%s; trainable parameters: %s of %s (%.3f%%)",
        len(selected),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        " of a quantized base" if quantized else "",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )


def lora_summary(peft_model: PeftModel) -> dict[str, int]:
    """Counts of adapted modules per group, read back from the wrapped model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    spec = spec_for(base, warn=False)
    # Classified by name: wrapping turned each adapted Linear into a LoraLayer with inner Linears.
    adapted = {n: classify_name(n, spec) for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    return count_groups(adapted)


def _attach_methods(peft_model: PeftModel) -> None:
    """Binds the saving methods on this instance (no class is changed)."""
    from visionft.model import saving

    peft_model.save_pretrained = types.MethodType(saving.save_adapters, peft_model)
    peft_model.save_pretrained_merged = types.MethodType(saving.save_pretrained_merged, peft_model)
