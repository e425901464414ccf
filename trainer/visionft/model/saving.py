"""Saving a LoRA-wrapped VLM: adapters (PEFT format), merged 16-bit weights, or merged 4-bit weights.

``save_adapters`` and ``save_pretrained_merged`` are bound onto the PeftModel that
``FastVisionModel.get_peft_model`` returns, as ``model.save_pretrained`` and
``model.save_pretrained_merged``; they also work as plain functions on any PeftModel.

Merging never touches the training model: the merged weights are computed one module at a time
(dequantize the base weight if it is 4-bit/8-bit, add each active adapter's delta) and streamed
into safetensors shards, so the model can keep training after a save and peak extra memory is
one shard.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.integrations import dequantize_module_weight
from safetensors.torch import save_file
from torch import nn

from visionft.model.info import get_load_info

logger = logging.getLogger(__name__)

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"200KiB"``.

    Raises:
        ValueError: the string is not a number followed by B, KB, MB, GB, KiB, MiB or GiB.
    """
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} must be a byte count or a size such as '5GB' or '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _processor_to_save(model, processor):
    if processor is not None:
        return processor
    info = get_load_info(model)
    return info.processor if info is not None else None


def save_adapters(model: PeftModel, save_directory: str | os.PathLike, processor=None, **kwargs) -> None:
    """Writes the LoRA adapters in PEFT format, plus the processor.

    ``peft.PeftModel.from_pretrained(base, save_directory)`` loads the result. Extra keyword
    arguments go to ``PeftModel.save_pretrained`` (the Trainer passes ``state_dict`` and
    ``safe_serialization`` when it checkpoints).

    Args:
        model (PeftModel): the adapted model.
        save_directory (str | os.PathLike): the folder to write.
        processor: the processor to save alongside; default: the one loaded with the model.
    """
    PeftModel.save_pretrained(model, save_directory, **kwargs)
    processor = _processor_to_save(model, processor)
    if processor is not None:
        processor.save_pretrained(save_directory)


def _is_quantized_param(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _dense(module: nn.Module) -> torch.Tensor:
    """The module's weight as a floating tensor, dequantized when it is a bitsandbytes weight."""
    if _is_quantized_param(module.weight):
        return dequantize_module_weight(module)
    return module.weight


def _merged_lora_weight(layer: LoraLayer) -> torch.Tensor:
    weight = _dense(layer.get_base_layer()).detach().float()
    if layer.merged:  # merge_adapter() already folded the deltas into the base weight
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).detach().float()
    return weight


def merged_tensors(model: PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` for the merged model, named as the plain transformers model names
    its state dict; tied parameters are yielded once (transformers re-ties them on load)."""
    base = model.get_base_model()
    seen: set[int] = set()
    done: list[str] = []  # prefixes of subtrees already emitted

    def own(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name == "weight" and _is_quantized_param(param):
                yield prefix + name, _dense(module).detach()
            else:
                yield prefix + name, param.detach()
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, buf.detach()

    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(d) for d in done):
            continue
        if isinstance(module, LoraLayer):
            done.append(prefix)
            yield prefix + "weight", _merged_lora_weight(module)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield prefix + "bias", bias.detach()
        elif isinstance(module, ModulesToSaveWrapper):
            done.append(prefix)
            trained = module.modules_to_save[module.active_adapters[0]]
            for sub_name, sub in trained.named_modules():
                yield from own(sub, prefix + (f"{sub_name}." if sub_name else ""))
        else:
            yield from own(module, prefix)


def write_sharded_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]], save_directory: Path, max_shard_size: int, dtype: torch.dtype
) -> list[str]:
    """Streams ``tensors`` (floating ones cast to ``dtype``) into ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``, or one ``model.safetensors`` when it fits in one.

    Returns:
        list[str]: the shard file names.
    """
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        part = save_directory / f".part-{len(parts):05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        parts.append((part, list(shard)))

    for name, tensor in tensors:
        tensor = tensor.to(
            device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype
        ).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if shard or not parts:
        flush()

    if len(parts) == 1:
        final = save_directory / "model.safetensors"
        parts[0][0].replace(final)
        return [final.name]
    weight_map, names = {}, []
    for i, (part, keys) in enumerate(parts, start=1):
        final_name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.replace(save_directory / final_name)
        names.append(final_name)
        weight_map.update(dict.fromkeys(keys, final_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def _merged_dtype(model: PeftModel, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    info = get_load_info(model)
    if info is not None and info.quantization is not None:
        return info.dtype  # the compute dtype: bf16/fp16
    floating = [p.dtype for p in model.get_base_model().parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32


def _plain_config(model: PeftModel, dtype: torch.dtype):
    config = copy.deepcopy(model.get_base_model().config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    config.use_cache = True
    return config


def save_merged_16bit(
    model: PeftModel,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes the merged model (config, shards, index, generation config); no processor."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = _merged_dtype(model, dtype)
    _plain_config(model, dtype).save_pretrained(directory)
    generation_config = getattr(model.get_base_model(), "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    for stale in [*directory.glob("model*.safetensors"), *directory.glob("model.safetensors.index.json")]:
        stale.unlink()  # a previous save with another shard count would confuse the loader
    with torch.no_grad():
        write_sharded_safetensors(merged_tensors(model), directory, parse_size(max_shard_size), dtype)
    return directory


def _save_merged_4bit(
    model: PeftModel, directory: Path, max_shard_size: int | str, dtype: torch.dtype | None
):
    if not torch.cuda.is_available():
        raise RuntimeError(
            "save_method='merged_4bit' re-quantizes with bitsandbytes, which needs a CUDA GPU; "
            "use save_method='merged_16bit' (or 'lora') on this machine"
        )
    from transformers import AutoModelForImageTextToText

    from visionft.model.loading import quantization_config

    info = get_load_info(model)
    compute = dtype or (info.dtype if info is not None and info.dtype != torch.float32 else torch.bfloat16)
    keep = list(info.keep_16bit) if info is not None else ["lm_head"]
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        save_merged_16bit(model, tmp, max_shard_size=max_shard_size, dtype=compute)
        quantized = AutoModelForImageTextToText.from_pretrained(
            tmp,
            dtype=compute,
            device_map={"": torch.cuda.current_device()},
            quantization_config=quantization_config(4, compute, keep),
        )
        quantized.save_pretrained(directory, max_shard_size=max_shard_size)
        del quantized
        torch.cuda.empty_cache()


def save_pretrained_merged(
    model: PeftModel,
    save_directory: str | os.PathLike,
    processor=None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> None:
    """Saves the model for serving: merged weights that plain transformers loads, or adapters.

    Args:
        model (PeftModel): the adapted model.
        save_directory (str | os.PathLike): the folder to write.
        processor: saved alongside; default: the one loaded with the model.
        save_method (str): ``"merged_16bit"``: LoRA merged into an unquantized copy of the base
            (4-bit bases are dequantized), written as sharded safetensors with an index and
            without a quantization_config. ``"merged_4bit"``: the same, re-quantized to NF4 (CUDA
            only). ``"lora"``: adapters only, as ``model.save_pretrained``. Default: "merged_16bit".
        max_shard_size (int | str): the largest shard, e.g. "5GB". Default: "5GB".
        dtype (torch.dtype | None): the dtype of merged weights; default: the compute dtype for a
            quantized base (bf16/fp16), else the dtype the base was loaded in (so an fp32 CPU
            model merges without rounding).

    Raises:
        ValueError: unknown ``save_method``.
        RuntimeError: ``"merged_4bit"`` without CUDA.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r} must be one of {', '.join(SAVE_METHODS)}")
    directory = Path(save_directory)
    if save_method == "lora":
        save_adapters(model, directory, processor=processor)
        return
    directory.mkdir(parents=True, exist_ok=True)
    if save_method == "merged_16bit":
        save_merged_16bit(model, directory, max_shard_size=max_shard_size, dtype=dtype)
    else:
        _save_merged_4bit(model, directory, max_shard_size, dtype)
    processor = _processor_to_save(model, processor)
    if processor is not None:
        processor.save_pretrained(directory)
    logger.info("saved %s model to %s", save_method, directory)
