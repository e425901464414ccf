"""Tiny random-weight VLMs with working processors, built offline, for tests and the quickstart.

There is no model hub here, so every supported architecture has a factory that builds, from a
config, a model with 1-2 layers and hidden sizes of 32-64, plus a processor whose tokenizer is a
small byte-level BPE (``visionft.testing.tokenizer``) carrying the architecture's real special
tokens (image placeholders, turn markers) and a chat template in the style of the real model
(``visionft.testing.chat_templates``). Images are small (28-64 px), so a CPU step takes
milliseconds.

Usage::

    from visionft.testing.tiny import TINY_ARCHS, build_tiny_vlm, save_tiny_vlm, tiny_image

    model, processor = build_tiny_vlm("qwen2_5_vl")          # in memory, fp32, eval mode
    path = save_tiny_vlm("qwen2_5_vl", tmp_path / "tiny")     # a folder from_pretrained loads
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[tiny_image("qwen2_5_vl")], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])

``TINY_ARCHS`` names the architectures: qwen2_vl, qwen2_5_vl, qwen3_vl, mllama, gemma3, llava,
llava_next and pixtral (a LLaVA model with a Pixtral vision tower, as the real Pixtral-12B is).
Every factory is deterministic for a given ``seed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    set_seed,
)

from visionft.model.compat import image_processor_class
from visionft.testing import chat_templates
from visionft.testing.tokenizer import build_bpe_tokenizer


@dataclass(frozen=True)
class TinyArch:
    """How to build one tiny architecture.

    Attributes:
        name (str): the key in ``TINY_ARCHS`` (also the HF ``model_type``, except pixtral -> llava).
        config (Callable[[dict[str, int]], PreTrainedConfig]): builds the model config from the
            tokenizer's special-token ids.
        processor (Callable[[], ProcessorMixin]): builds the processor.
        image_size (tuple[int, int]): (width, height) of the images ``tiny_image`` makes.
    """

    name: str
    config: Callable[[dict[str, int]], PreTrainedConfig]
    processor: Callable[[], ProcessorMixin]
    image_size: tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL
# --------------------------------------------------------------------------------------------------

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_tokenizer(default_system: str | None):
    return build_bpe_tokenizer(
        _QWEN_SPECIALS,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=chat_templates.chatml(
            "<|vision_start|><|image_pad|><|vision_end|>", default_system=default_system
        ),
    )


def _qwen_processor(
    processor_cls_name: str, video_cls_name: str, patch_size: int, default_system: str | None
):
    import transformers

    factor = patch_size * 2  # patch size x spatial merge
    image_processor = image_processor_class("Qwen2VLImageProcessor")(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        # Pixel budget: at least 2x2 merged tokens, at most 4x4, so tiny images stay tiny.
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2},
    )
    processor_cls = getattr(transformers, processor_cls_name)
    tokenizer = _qwen_tokenizer(default_system)
    # Qwen processors require a video processor (and so torchvision) even for images-only use.
    video_processor = getattr(transformers, video_cls_name)(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2 * 2},
    )
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def _qwen_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text(ids: dict[str, int], vocab_size: int, **extra) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **extra,
    }


def _qwen2_vl_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=_qwen_text(ids, vocab_size),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_ids(ids),
    )


def _qwen2_5_vl_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=_qwen_text(ids, vocab_size),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        **_qwen_ids(ids),
    )


def _qwen3_vl_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import Qwen3VLConfig

    text = _qwen_text(ids, vocab_size, head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    return Qwen3VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        **_qwen_ids(ids),
    )


# --------------------------------------------------------------------------------------------------
# Llama 3.2 Vision (Mllama)
# --------------------------------------------------------------------------------------------------

_LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
_MLLAMA_TILE = 28


def mllama_processor(tile_size: int = _MLLAMA_TILE, max_image_tiles: int = 2):
    """The stand-in Llama 3 processor: tiles of ``tile_size`` px, at most ``max_image_tiles`` per image."""
    from transformers import MllamaProcessor

    tokenizer = build_bpe_tokenizer(
        _LLAMA3_SPECIALS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        named_tokens={"image_token": "<|image|>"},
        chat_template=chat_templates.llama3("<|image|>"),
    )
    image_processor = image_processor_class("MllamaImageProcessor")(
        size={"height": tile_size, "width": tile_size}, max_image_tiles=max_image_tiles
    )
    return MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def _mllama_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import MllamaConfig

    return MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_size": 64,
            "image_size": _MLLAMA_TILE,
            "patch_size": 14,
            "max_num_tiles": 2,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,  # hidden_size x (1 + len(intermediate_layers_indices))
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "cross_attention_layers": [1],
            "max_position_embeddings": 1024,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": ids["<|eot_id|>"],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        image_token_index=ids["<|image|>"],
    )


# --------------------------------------------------------------------------------------------------
# Gemma 3
# --------------------------------------------------------------------------------------------------

_GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
_GEMMA_IMAGE = 56
_GEMMA_TOKENS = 4


def gemma3_processor(image_size: int = _GEMMA_IMAGE, tokens_per_image: int = _GEMMA_TOKENS):
    """A Gemma 3 processor with the stand-in tokenizer; ``image_size`` and ``tokens_per_image`` of the
    tiny model by default (896 and 256 for a real-shaped one)."""
    from transformers import Gemma3Processor

    tokenizer = build_bpe_tokenizer(
        _GEMMA_SPECIALS,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=chat_templates.gemma("<start_of_image>"),
    )
    image_processor = image_processor_class("Gemma3ImageProcessor")(
        size={"height": image_size, "width": image_size}
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=tokenizer.chat_template,
    )


def _gemma3_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 1024,
            "pad_token_id": ids["<pad>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "bos_token_id": ids["<bos>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _GEMMA_IMAGE,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=_GEMMA_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


# --------------------------------------------------------------------------------------------------
# LLaVA 1.5, LLaVA-NeXT (CLIP + Llama/Mistral) and Pixtral (Pixtral vision + Mistral, via LLaVA)
# --------------------------------------------------------------------------------------------------

_LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_PIXTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]
_CLIP_IMAGE = 28
_PIXTRAL_IMAGE = 64


def _llama2_tokenizer(template: str):
    return build_bpe_tokenizer(
        _LLAMA2_SPECIALS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        named_tokens={"image_token": "<image>"},
        chat_template=template,
    )


def _clip_vision() -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _CLIP_IMAGE,
        "patch_size": 14,
        "projection_dim": 32,
    }


def _llama_text(ids: dict[str, int], vocab_size: int, model_type: str) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
    }


def _clip_image_processor(image_size: int = _CLIP_IMAGE, **extra):
    return image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **extra,
    )


def llava_processor(image_size: int = _CLIP_IMAGE):
    """A LLaVA 1.5 processor with the stand-in tokenizer (vicuna turns); the tiny model's ``image_size`` by
    default (336 for a real-shaped one)."""
    from transformers import LlavaProcessor

    tokenizer = _llama2_tokenizer(chat_templates.vicuna("<image>"))
    return LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _llava_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(ids, vocab_size, "llama"),
        image_token_index=ids["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


_NEXT_PINPOINTS = [[_CLIP_IMAGE, _CLIP_IMAGE], [_CLIP_IMAGE, 2 * _CLIP_IMAGE], [2 * _CLIP_IMAGE, _CLIP_IMAGE]]


def llava_next_processor(image_size: int = _CLIP_IMAGE, pinpoints: list[list[int]] | None = None):
    """A LLaVA-NeXT processor with the stand-in tokenizer ([INST] turns): tiles of ``image_size`` (the tiny
    model's by default, 336 for a real-shaped one) on the grids ``pinpoints`` (default: 1x1, 1x2 and 2x1
    tiles, the tiny model's)."""
    from transformers import LlavaNextProcessor

    tokenizer = _llama2_tokenizer(chat_templates.mistral_inst("<image>\\n", space=True))
    image_processor = image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints
        or [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _llava_next_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(ids, vocab_size, "mistral"),
        image_token_index=ids["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=_NEXT_PINPOINTS,
    )


def pixtral_processor(longest_edge: int = _PIXTRAL_IMAGE):
    """A Pixtral processor with the stand-in tokenizer ([INST] turns); images fitted to ``longest_edge``,
    the tiny model's by default (1024 for a real-shaped one)."""
    from transformers import PixtralProcessor

    tokenizer = build_bpe_tokenizer(
        _PIXTRAL_SPECIALS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        named_tokens={
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
        },
        chat_template=chat_templates.mistral_inst("[IMG]", space=False),
    )
    image_processor = image_processor_class("PixtralImageProcessor")(
        size={"longest_edge": longest_edge}, patch_size=16
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=1,
        chat_template=tokenizer.chat_template,
    )


def _pixtral_config(ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    from transformers import LlavaConfig

    vision = {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 16,
        "image_size": _PIXTRAL_IMAGE,
        "patch_size": 16,
    }
    return LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(ids, vocab_size, "mistral"),
        image_token_index=ids["[IMG]"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
    )


TINY_ARCHS: dict[str, TinyArch] = {
    a.name: a
    for a in (
        TinyArch(
            "qwen2_vl",
            _qwen2_vl_config,
            lambda: _qwen_processor(
                "Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14, "You are a helpful assistant."
            ),
            (56, 56),
        ),
        TinyArch(
            "qwen2_5_vl",
            _qwen2_5_vl_config,
            lambda: _qwen_processor(
                "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14, "You are a helpful assistant."
            ),
            (56, 56),
        ),
        TinyArch(
            "qwen3_vl",
            _qwen3_vl_config,
            lambda: _qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16, None),
            (64, 64),
        ),
        TinyArch("mllama", _mllama_config, mllama_processor, (_MLLAMA_TILE, _MLLAMA_TILE)),
        TinyArch("gemma3", _gemma3_config, gemma3_processor, (_GEMMA_IMAGE, _GEMMA_IMAGE)),
        TinyArch("llava", _llava_config, llava_processor, (_CLIP_IMAGE, _CLIP_IMAGE)),
        TinyArch("llava_next", _llava_next_config, llava_next_processor, (_CLIP_IMAGE, _CLIP_IMAGE)),
        TinyArch("pixtral", _pixtral_config, pixtral_processor, (_PIXTRAL_IMAGE, 48)),
    )
}


def _arch(arch: str) -> TinyArch:
    try:
        return TINY_ARCHS[arch]
    except KeyError:
        raise ValueError(
            f"arch={arch!r} is not a tiny architecture; pick one of {sorted(TINY_ARCHS)}"
        ) from None


#: Weight init std of the tiny models. The usual 0.02 leaves lm_head rows so short (0.02 x sqrt(64))
#: that, behind the final norm, no logit can rise much above the others: a frozen random head
#: would cap how far LoRA can lower the loss. 0.2 lets a tiny model memorise a few answers.
TINY_INIT_STD = 0.2


def _widen_init(config: PreTrainedConfig) -> None:
    for sub in (config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))):
        if sub is not None and hasattr(sub, "initializer_range"):
            sub.initializer_range = TINY_INIT_STD


def build_tiny_processor(arch: str) -> ProcessorMixin:
    """Builds the tiny processor (tokenizer, image processor, chat template) for ``arch``.

    Raises:
        ValueError: ``arch`` is not in ``TINY_ARCHS``.
    """
    return _arch(arch).processor()


def build_tiny_vlm(arch: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Builds a tiny random-weight model (fp32, eval mode) and its processor.

    Args:
        arch (str): one of ``TINY_ARCHS``.
        seed (int): seeds the weight initialisation. Default: 0.

    Returns:
        tuple[PreTrainedModel, ProcessorMixin]: the model and the processor.

    Raises:
        ValueError: ``arch`` is not in ``TINY_ARCHS``.
    """
    spec = _arch(arch)
    processor = spec.processor()
    tokenizer = processor.tokenizer
    ids = dict(tokenizer.get_added_vocab())  # the special tokens, each a single id
    config = spec.config(ids, len(tokenizer))
    _widen_init(config)
    set_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()
    return model, processor


def open_image_paths(model: torch.nn.Module, seed: int = 2) -> None:
    """Opens what a new model starts closed and a trained checkpoint has open: Gemma 3's projection of the
    image features (zero) and Mllama's cross-attention and tile-embedding gates (zero). Closed, the images
    add nothing to the text, and the vision adapters get no gradient to train on."""
    inner = getattr(model, "model", model)
    projection = getattr(getattr(inner, "multi_modal_projector", None), "mm_input_projection_weight", None)
    with torch.no_grad():
        if projection is not None and not projection.any():
            noise = torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed))
            projection.copy_(noise.to(projection) * 0.2)
        for name, gate in model.named_parameters():
            if name.endswith("gate") and gate.dim() <= 1 and not gate.any():
                gate.fill_(0.5)


def save_tiny_vlm(arch: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Builds the tiny model and processor for ``arch`` and saves both to ``path``.

    The folder holds config.json, model.safetensors and the processor and tokenizer files, so
    ``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
    (and ``FastVisionModel.from_pretrained(path)``) load it offline.

    Returns:
        Path: ``path``.
    """
    path = Path(path)
    model, processor = build_tiny_vlm(arch, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_image(
    arch: str, color: tuple[int, int, int] = (200, 30, 30), seed: int | None = None
) -> Image.Image:
    """An RGB image of the size ``arch``'s tiny processor expects: a coloured square on a grey field.

    Args:
        arch (str): one of ``TINY_ARCHS``.
        color (tuple[int, int, int]): the square's colour. Default: red.
        seed (int | None): when given, the square's position is drawn from it, so different seeds
            give different images. Default: None (centred).
    """
    width, height = _arch(arch).image_size
    image = Image.new("RGB", (width, height), (128, 128, 128))
    side = min(width, height) // 2
    if seed is None:
        left, top = (width - side) // 2, (height - side) // 2
    else:
        gen = torch.Generator().manual_seed(seed)
        left = int(torch.randint(0, width - side + 1, (1,), generator=gen))
        top = int(torch.randint(0, height - side + 1, (1,), generator=gen))
    image.paste(color, (left, top, left + side, top + side))
    return image
