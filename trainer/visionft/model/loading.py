"""``FastVisionModel.from_pretrained``: load a VLM and its processor, 4-bit on CUDA.

The steps, in order: check the arguments (each error names the argument and the fix), read the
config, pick the dtype, build the bitsandbytes config with the architecture's 16-bit skip list,
load with ``AutoModelForImageTextToText`` and ``AutoProcessor``, and record a ``LoadInfo`` on the
model. Without CUDA the model loads in full precision and one warning says that 4-bit needs a GPU.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from visionft.model.architectures import get_arch_spec, supported_model_types
from visionft.model.classify import classify_linear_modules
from visionft.model.compat import image_text_to_text_model_types
from visionft.model.info import LoadInfo, set_load_info

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str | None, cuda: bool) -> torch.dtype:
    """The compute dtype: ``dtype`` if given, else bf16 on GPUs that support it, fp16 on other GPUs,
    fp32 on CPU.

    Raises:
        ValueError: ``dtype`` is not a floating dtype or a known name for one.
    """
    if dtype is None or dtype == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(
                f"dtype={dtype!r} is not understood; use one of {sorted(_DTYPES)} or a torch dtype"
            )
        return _DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(
        f"dtype={dtype!r} must be a floating torch dtype (torch.bfloat16, torch.float16, torch.float32)"
    )


def _check_source(model_name_or_path: str) -> str:
    """Validates a local folder; hub ids pass through (transformers reports those)."""
    if not isinstance(model_name_or_path, (str, os.PathLike)) or not str(model_name_or_path):
        raise ValueError(f"model_name_or_path={model_name_or_path!r} must be a folder path or a hub id")
    name = str(model_name_or_path)
    if re.match(r"^[a-z][a-z0-9+]*://", name):
        raise ValueError(
            f"model_name_or_path={name!r} is a URI; sync it to a local folder first "
            "(the visionft-train CLI does this for s3:// model URIs) and pass the folder"
        )
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model_name_or_path={name!r} is a file; pass the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model_name_or_path={name!r} has no config.json; pass the folder a model was saved to "
                "(save_pretrained / save_pretrained_merged), not a LoRA adapter folder or a parent folder"
            )
        return str(path)
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ValueError(f"model_name_or_path={name!r} does not exist; pass an existing model folder")
    return name


def _check_model_type(config, trust_remote_code: bool) -> None:
    model_type = config.model_type
    if model_type in image_text_to_text_model_types() or trust_remote_code:
        if get_arch_spec(model_type) is None:
            logger.warning(
                "model_type %r is not in the architecture map (mapped: %s); it loads, and LoRA "
                "module selection uses the keyword fallback",
                model_type,
                ", ".join(supported_model_types()),
            )
        return
    raise ValueError(
        f"model_type {model_type!r} is not an image-text-to-text model; supported architectures: "
        f"{', '.join(supported_model_types())} (other AutoModelForImageTextToText types load with a "
        "keyword fallback; custom code needs trust_remote_code=True)"
    )


def _keep_16bit(config, trust_remote_code: bool) -> list[str]:
    """Modules to keep out of quantization: the mapped list, or for unmapped architectures every
    Linear the classifier puts in the "other" group (projector, lm_head), found on a meta-device copy."""
    spec = get_arch_spec(config.model_type)
    if spec is not None:
        return list(spec.keep_16bit)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    return [name for name, group in classify_linear_modules(skeleton, spec=None).items() if group == "other"]


def quantization_config(bits: int, dtype: torch.dtype, keep_16bit: list[str]):
    """The bitsandbytes config of ``load_in_4bit`` (NF4, double quantization) or ``load_in_8bit``.

    Args:
        bits (int): 4 or 8.
        dtype (torch.dtype): the 4-bit compute dtype.
        keep_16bit (list[str]): module names (from the start of the name) left unquantized.
    """
    try:
        import bitsandbytes  # noqa: F401  (imported only to fail early with a clear message)
    except ImportError as err:
        raise ImportError(
            f"load_in_{bits}bit=True needs bitsandbytes: install the gpu extra (pip install 'visionft[gpu]') "
            f"or pass load_in_{bits}bit=False"
        ) from err
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=keep_16bit,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_16bit)


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
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit=True and load_in_8bit=True: pick one (QLoRA is load_in_4bit=True)")
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer")
    if "quantization_config" in kwargs:
        raise ValueError("quantization_config is built by visionft; use load_in_4bit / load_in_8bit instead")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        # As in the Unsloth API: full fine-tuning trains every weight, which cannot be quantized.
        logger.warning("full_finetuning=True loads unquantized weights (load_in_4bit/8bit ignored)")
        load_in_4bit = load_in_8bit = False

    source = _check_source(model_name_or_path)
    hub_kwargs = {"trust_remote_code": trust_remote_code}
    if local_files_only is not None:
        hub_kwargs["local_files_only"] = local_files_only
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        raise ValueError(
            f"model_name_or_path={source!r}: no local folder by that name and the hub copy could not be read "
            f"({err.__class__.__name__}); pass a local model folder"
        ) from err
    _check_model_type(config, trust_remote_code)

    cuda = torch.cuda.is_available()
    compute_dtype = resolve_dtype(dtype, cuda)
    pre_quantized = getattr(config, "quantization_config", None) is not None
    bits = 4 if load_in_4bit else 8 if load_in_8bit else None
    load_kwargs = dict(hub_kwargs, dtype=compute_dtype, **kwargs)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    keep_16bit: list[str] = []
    quantization = None
    if pre_quantized:
        # The checkpoint says how it is quantized; a second quantization_config would conflict.
        if not cuda:
            raise ValueError(
                f"model_name_or_path={source!r} is a pre-quantized checkpoint, which needs a CUDA GPU; "
                "use its unquantized (16-bit) version on this machine"
            )
        qc = config.quantization_config
        get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
        quantization = (
            "4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else get("quant_method")
        )
        keep_16bit = list(get("llm_int8_skip_modules") or [])
    elif bits is not None and not cuda:
        logger.warning(
            "load_in_%dbit=True needs a CUDA GPU (bitsandbytes); none is available, so the "
            "model loads unquantized in %s. Pass load_in_%dbit=False to silence this.",
            bits,
            str(compute_dtype).removeprefix("torch."),
            bits,
        )
    elif bits is not None:
        keep_16bit = _keep_16bit(config, trust_remote_code)
        load_kwargs["quantization_config"] = quantization_config(bits, compute_dtype, keep_16bit)
        quantization = f"{bits}bit"
    if cuda:
        # One GPU per process (DDP places replicas itself): "auto" would spread a model over all GPUs.
        load_kwargs["device_map"] = (
            device_map if device_map is not None else {"": torch.cuda.current_device()}
        )
    elif device_map is not None:
        load_kwargs["device_map"] = device_map

    model = AutoModelForImageTextToText.from_pretrained(source, **load_kwargs)
    try:
        processor = AutoProcessor.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"model_name_or_path={source!r}: the model loaded but its processor did not ({err}); the folder "
            "needs the processor files (preprocessor_config.json, tokenizer files, chat template)"
        ) from err
    model.max_seq_length = max_seq_length
    set_load_info(
        model,
        LoadInfo(
            source=source,
            model_type=config.model_type,
            max_seq_length=max_seq_length,
            dtype=compute_dtype,
            quantization=quantization,
            pre_quantized=pre_quantized,
            keep_16bit=keep_16bit,
            processor=processor,
        ),
    )
    if full_finetuning:
        for param in model.parameters():
            param.requires_grad_(param.is_floating_point())
    return model, processor
