"""``FastVisionModel``: the user-facing entry points, in the shape of Unsloth's vision API.

Each method delegates to one module: loading (``visionft.loading``), LoRA (``visionft.lora``),
saving (``visionft.saving``, bound onto the returned PeftModel). The class only groups them so
that code written for Unsloth runs after changing its import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from visionft import loading, lora


def _configs(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return []
    subs = [getattr(config, name, None) for name in ("text_config", "language_config")]
    return [config, *[c for c in subs if c is not None]]


class FastVisionModel:
    """Load, adapt, train and save VLMs with QLoRA."""

    @staticmethod
    def from_pretrained(
        model_name_or_path: str | os.PathLike,
        max_seq_length: int = 2048,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        dtype: torch.dtype | str | None = None,
        full_finetuning: bool = False,
        trust_remote_code: bool = False,
        device_map: str | dict | None = None,
        local_files_only: bool | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ):
        """Loads a VLM (``AutoModelForImageTextToText``) and its processor (``AutoProcessor``).

        On CUDA, ``load_in_4bit`` quantizes to NF4 with bitsandbytes (double quantization, compute
        in ``dtype``), keeping the architecture's sensitive modules (patch embedding, projector or
        merger, ``lm_head``) in 16-bit. A checkpoint that is already quantized (its config has a
        quantization_config) loads as it is. Without CUDA the model loads unquantized and one
        warning says that 4-bit needs a GPU.

        Args:
            model_name_or_path (str | os.PathLike): a local model folder (holding config.json) or a
                hub id.
            max_seq_length (int): the longest training sequence; recorded on the model
                (``model.max_seq_length``) for the data collator. Default: 2048.
            load_in_4bit (bool): QLoRA: NF4 weights on CUDA. Default: True.
            load_in_8bit (bool): LLM.int8 weights on CUDA. Default: False.
            dtype (torch.dtype | str | None): compute dtype; None picks bf16 on GPUs that support
                it, fp16 on other GPUs, fp32 on CPU. Default: None.
            full_finetuning (bool): train all weights; turns quantization off. Default: False.
            trust_remote_code (bool): allow model code from the checkpoint. Default: False.
            device_map (str | dict | None): passed to transformers; None puts the whole model on
                the current CUDA device (or the CPU). Default: None.
            local_files_only (bool | None): never reach a hub; None follows HF_HUB_OFFLINE.
            attn_implementation (str | None): "sdpa", "eager", "flash_attention_2", ...
            **kwargs: passed to ``AutoModelForImageTextToText.from_pretrained``.

        Returns:
            tuple: ``(model, processor)``.

        Raises:
            ValueError: both 4-bit and 8-bit; a path that does not exist or has no config.json;
                a URI; a model type that is not image-text-to-text (the message lists the
                supported ones); a bad ``max_seq_length`` or ``dtype``; a pre-quantized
                checkpoint without CUDA; a folder without processor files.
            ImportError: 4-bit/8-bit on CUDA without bitsandbytes.
        """
        return loading.from_pretrained(
            model_name_or_path,
            max_seq_length=max_seq_length,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            dtype=dtype,
            full_finetuning=full_finetuning,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            local_files_only=local_files_only,
            attn_implementation=attn_implementation,
            **kwargs,
        )

    @staticmethod
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
        **kwargs,
    ):
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
            **kwargs: passed to ``peft.LoraConfig`` (e.g. ``init_lora_weights``).

        Returns:
            peft.PeftModel: the wrapped model.

        Raises:
            ValueError: both vision and language off, or both attention and MLP off (the message
                names the switches); malformed ``target_modules``; nothing matched; the model
                already has adapters.
        """
        return lora.get_peft_model(
            model,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=target_modules,
            finetune_vision_layers=finetune_vision_layers,
            finetune_language_layers=finetune_language_layers,
            finetune_attention_modules=finetune_attention_modules,
            finetune_mlp_modules=finetune_mlp_modules,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            **kwargs,
        )

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
        from visionft.compat import disable_activation_checkpointing

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
