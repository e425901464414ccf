"""End-to-end training benchmark on data whose shapes vary: VisionFT against Unsloth and plain Hugging Face,
each in its own documented path and its own process, on one GPU, in one command per architecture.

    python bench/e2e.py --arch qwen2_5_vl --out bench/logs/DATE/e2e-qwen --work /tmp/e2e
    python bench/e2e.py --arch gemma3 --out bench/logs/DATE/e2e-gemma --work /tmp/e2e
    python bench/e2e.py --arch qwen3_vl --out bench/logs/DATE/e2e-qwen3 --work /tmp/e2e
    python bench/e2e.py --arch llava --out bench/logs/DATE/e2e-llava --work /tmp/e2e
    python bench/e2e.py --arch llava_next --out bench/logs/DATE/e2e-llava-next --work /tmp/e2e
    python bench/e2e.py --arch pixtral --max-seq-length 4608 --out bench/logs/DATE/e2e-pixtral --work /tmp/e2e
    python bench/e2e.py --arch mllama --out bench/logs/DATE/e2e-mllama --work /tmp/e2e
    python bench/e2e.py --tiny --arch qwen2_5_vl --steps 3 --out /tmp/e2e-tiny   # CPU, tiny model (CI)

What runs (same random-weight model folder, same generated data, batch 4, LoRA r=16 / alpha 16 /
dropout 0 on every linear layer of vision and language, 8-bit AdamW, lr 2e-4, seed 3407, N steps):

- ``visionft``: ``visionft-train`` (``visionft.job.cli.main``) on a VisionFineTune manifest written
  here, with ``training.packing`` and ``training.optimizations`` on: the real CLI path.
- ``unsloth``: Unsloth's documented vision recipe (``FastVisionModel`` in 4 bit with Unsloth's
  checkpointing, ``UnslothVisionDataCollator(model, tokenizer, resize="max")`` so that it sees the
  same image tokens, TRL's ``SFTTrainer``). Skipped (and said so) where unsloth is not installed.
- ``plain``: transformers + bitsandbytes (NF4, vision tower in 16 bit) + PEFT + TRL's ``SFTTrainer``
  on its own VLM path (a ``messages`` + ``images`` dataset, the processor as ``processing_class``).

One timer serves all three: a ``TrainerCallback`` added in ``transformers.Trainer.__init__`` (so no
system's code changes) that synchronises the device at every ``on_step_end``. Each system's data
collator is wrapped to count the real (unpadded) tokens and samples of each batch it builds, in order.

Reported per system (JSON and a table): samples/s and real tokens/s over the steady steps (after
``--warmup``), median s/step, GPU busy share (``torch.profiler`` over the last ``--profile-steps``
steps: merged kernel intervals / wall time), graph-replay share (VisionFT's ``run.json``), time from
process start to the first optimizer step, peak allocated memory, and the loss curve. ``--systems
visionft,plain,plain:1`` runs plain twice with two seeds (LoRA init and data order): the log and the JSON
(``loss_band``) then give plain's own run-to-run spread of the mean loss over the last 10 steps, and how far
visionft's mean is from plain's.

The model folders: ``qwen2_5_vl`` is the Qwen2.5-VL-7B shape of ``bench/qlora_step.py`` (8.29 B
parameters, its stand-in processor); ``gemma3`` is a Gemma-3-4B shape (SigLIP at 896 px, 256 tokens per
image, 262,208-token vocabulary, 34 layers) with the stand-in Gemma tokenizer of ``visionft.testing``;
``qwen3_vl`` is a Qwen3-VL-8B shape (16 px patches, DeepStack at layers 8/16/24, 36 text layers);
``llava`` a LLaVA-1.5-7B shape (CLIP ViT-L/14 at 336 px, Llama-2-7B text), ``llava_next`` a
LLaVA-NeXT-7B (Mistral) shape (the same tower on 336 px tiles of five grids up to 1,008 px, plus the
downscaled image, Mistral-7B text) and ``pixtral`` a Pixtral-12B shape (Pixtral tower up to 1,024 px, Mistral-NeMo-12B text; a 1,008 px image is 4,032 tokens, hence its
longer ``--max-seq-length``) and ``mllama`` a Llama-3.2-11B-Vision shape (560 px tiles, up to four per
image, Llama-3.1-8B-sized text with eight gated cross-attention layers added), each with a stand-in
processor of ``visionft.testing.tiny``.
``--tiny`` uses the tiny models of ``visionft.testing.tiny`` on CPU (no 4 bit, AdamW in fp32).

The dataset (``visionft.testing.varied``): one image per sample, sides drawn from 56-1,008 px (tiny: 28-
112), answers 30-500 characters (one token each under the stand-in tokenizers), as an imagefolder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS = ("visionft", "plain", "unsloth")  # Unsloth last: its compile takes what time is left
SEED = 3407
LR = 2e-4
ARCHS = ("qwen2_5_vl", "gemma3", "qwen3_vl", "llava", "llava_next", "pixtral", "mllama")
#: The model type of an architecture whose name is not one (Pixtral-12B is a LLaVA model).
MODEL_TYPE = {"pixtral": "llava"}


# --------------------------------------------------------------------------------------------------
# Model folders and data
# --------------------------------------------------------------------------------------------------


def build_gemma3_folder(folder: Path) -> None:
    """A random-weight Gemma-3-4B-shaped model (bf16, on the GPU) and its stand-in processor."""
    import torch
    from transformers import AutoModelForImageTextToText, Gemma3Config
    from visionft.testing.tiny import gemma3_processor

    processor = gemma3_processor(image_size=896, tokens_per_image=256)
    ids = dict(processor.tokenizer.get_added_vocab())
    config = Gemma3Config(
        text_config={
            "vocab_size": 262208,
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 1024,
            "max_position_embeddings": 131072,
            "pad_token_id": ids["<pad>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "bos_token_id": ids["<bos>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # starts at zero in transformers: the images would add nothing to the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    _save(model, processor, folder)


def build_qwen3_vl_folder(folder: Path) -> None:
    """A random-weight Qwen3-VL-8B-shaped model (bf16, on the GPU): the stand-in Qwen tokenizer of
    ``bench/qlora_step.py`` with Qwen3-VL's 16 px patches."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig
    from visionft.model.compat import image_processor_class

    sys.path.insert(0, str(HERE))
    import qlora_step

    qwen = qlora_step.build_processor()
    patches = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = transformers.Qwen3VLProcessor(
        image_processor=image_processor_class("Qwen2VLImageProcessor")(**patches),
        tokenizer=qwen.tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(**patches),
        chat_template=qwen.chat_template,
    )
    tok = qwen.tokenizer
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
            "hidden_act": "gelu_pytorch_tanh",
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _save(model, processor, folder)


#: CLIP ViT-L/14 at 336 px, the tower of LLaVA 1.5 and LLaVA-NeXT.
_CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def build_llava_folder(folder: Path) -> None:
    """A random-weight LLaVA-1.5-7B-shaped model (bf16, on the GPU): CLIP ViT-L/14 at 336 px (576 tokens
    per image, features of the second-to-last layer), Llama-2-7B text, with the stand-in vicuna processor
    of ``visionft.testing.tiny``."""
    import torch
    from transformers import AutoModelForImageTextToText, LlavaConfig
    from visionft.testing.tiny import llava_processor

    processor = llava_processor(image_size=336)
    ids = dict(processor.tokenizer.get_added_vocab())
    config = LlavaConfig(
        vision_config=dict(_CLIP_L_336),
        text_config={
            "model_type": "llama",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _save(model, processor, folder)


def build_llava_next_folder(folder: Path) -> None:
    """A random-weight LLaVA-NeXT-7B (Mistral)-shaped model (bf16, on the GPU): CLIP ViT-L/14 on 336 px
    tiles (576 tokens each, features of the second-to-last layer) laid on the grids 1x2, 2x1, 2x2, 1x3 and
    3x1 plus the downscaled image, the learned newline after each feature row, Mistral-7B text, with the
    stand-in [INST] processor of ``visionft.testing.tiny``."""
    import torch
    from transformers import AutoModelForImageTextToText, LlavaNextConfig
    from visionft.testing.tiny import llava_next_processor

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = llava_next_processor(image_size=336, pinpoints=pinpoints)
    ids = dict(processor.tokenizer.get_added_vocab())
    config = LlavaNextConfig(
        vision_config=dict(_CLIP_L_336),
        text_config={
            "model_type": "mistral",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=576,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _save(model, processor, folder)


def build_pixtral_folder(folder: Path) -> None:
    """A random-weight Pixtral-12B-shaped model (bf16, on the GPU): the Pixtral tower (16 px patches, images
    up to 1,024 px at their own sizes, 2D rotary positions), Mistral-NeMo-12B text, with the stand-in
    [INST] processor of ``visionft.testing.tiny``."""
    import torch
    from transformers import AutoModelForImageTextToText, LlavaConfig
    from visionft.testing.tiny import pixtral_processor

    processor = pixtral_processor(longest_edge=1024)
    ids = dict(processor.tokenizer.get_added_vocab())
    config = LlavaConfig(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "head_dim": 64,
            "image_size": 1024,
            "patch_size": 16,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
            # Pixtral-12B's own setting (the config class defaults to GELU): a SwiGLU feed-forward.
            "hidden_act": "silu",
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": 131072,
            "hidden_size": 5120,
            "intermediate_size": 14336,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 1024000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e9},
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["[IMG]"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _save(model, processor, folder)


def build_mllama_folder(folder: Path) -> None:
    """A random-weight Llama-3.2-11B-Vision-shaped model (bf16, on the GPU): the tiled ViT-H/14 on 560 px
    tiles (up to four per image, 1,601 tokens each, the 32 local and 8 global layers, five intermediate
    layers in the features), Llama-3.1-8B-sized text (32 self-attention layers, the llama3 rotary
    scaling) with eight gated cross-attention layers among them, 40 in all, with the stand-in Llama 3
    processor of ``visionft.testing.tiny``."""
    import torch
    from transformers import AutoModelForImageTextToText, MllamaConfig
    from visionft.testing.tiny import mllama_processor, open_image_paths

    processor = mllama_processor(tile_size=560, max_image_tiles=4)
    ids = dict(processor.tokenizer.get_added_vocab())
    config = MllamaConfig(
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_global_layers": 8,
            "attention_heads": 16,
            "image_size": 560,
            "patch_size": 14,
            "max_num_tiles": 4,
            "intermediate_layers_indices": [3, 7, 15, 23, 30],
            "vision_output_dim": 7680,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
            "norm_eps": 1e-5,
        },
        text_config={
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "rms_norm_eps": 1e-5,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": ids["<|eot_id|>"],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        image_token_index=ids["<|image|>"],
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    open_image_paths(model)  # a new model's gates are closed: the images would reach nothing
    _save(model, processor, folder)


def _save(model, processor, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "n_params.txt").write_text(str(sum(p.numel() for p in model.parameters())))
    tmp.rename(folder)


def build_folder(arch: str, folder: Path, tiny: bool) -> None:
    if tiny:
        from visionft.testing.tiny import save_tiny_vlm

        save_tiny_vlm(arch, folder.with_name(folder.name + ".partial"))
        folder.with_name(folder.name + ".partial").rename(folder)
    elif arch == "qwen2_5_vl":
        sys.path.insert(0, str(HERE))
        import qlora_step

        qlora_step.build_model_folder(folder)
    elif arch == "gemma3":
        build_gemma3_folder(folder)
    elif arch == "qwen3_vl":
        build_qwen3_vl_folder(folder)
    elif arch == "llava":
        build_llava_folder(folder)
    elif arch == "llava_next":
        build_llava_next_folder(folder)
    elif arch == "pixtral":
        build_pixtral_folder(folder)
    elif arch == "mllama":
        build_mllama_folder(folder)
    else:
        raise ValueError(f"--arch {arch}: one of {', '.join(ARCHS)}")


def build_dataset(folder: Path, n: int, tiny: bool) -> None:
    from visionft.testing.varied import draw_samples, write_imagefolder

    if tiny:
        samples = draw_samples(n, seed=SEED, min_side=28, max_side=112, min_answer=10, max_answer=60)
    else:
        samples = draw_samples(n, seed=SEED)
    tmp = folder.with_name(folder.name + ".partial")
    write_imagefolder(tmp, samples)
    tmp.rename(folder)


def _records(data: Path) -> list[dict]:
    lines = (data / "train" / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------------------
# The shared timer
# --------------------------------------------------------------------------------------------------


class _Counting:
    """Wraps a data collator: remembers the real tokens and samples of each batch, in order."""

    def __init__(self, collator, counts: deque) -> None:
        self.__dict__["_inner"] = collator
        self.__dict__["_counts"] = counts

    def __getattr__(self, name):
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_inner"], name, value)

    def __call__(self, features):
        batch = self.__dict__["_inner"](features)
        info = batch.get("visionft_row") if isinstance(batch, dict) else None
        if info is not None:
            self.__dict__["_counts"].append((info.real_tokens, info.samples))
        else:
            mask = batch.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            self.__dict__["_counts"].append((tokens, int(batch["input_ids"].shape[0])))
        return batch


def _install_timer(record: dict, profile_from: int, profile_steps: int):
    """Adds the timing callback to every ``transformers.Trainer`` built from now on (module docstring)."""
    import torch
    import transformers
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    counts: deque = deque()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.prof = None
            self.prof_t0 = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                record["alloc_at_begin_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            record["train_begin_s"] = time.time() - record["t0"]

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == profile_from and self.prof is None and profile_steps and cuda:
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.prof_t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.time()
            tokens, samples = counts.popleft() if counts else (0, 0)
            record["steps"].append({"t": now - record["t0"], "tokens": tokens, "samples": samples})
            if cuda and len(record["steps"]) <= 8:  # where the peak is reached: warm-up, capture, replay
                record.setdefault("peak_by_step_gib", []).append(
                    round(torch.cuda.max_memory_allocated() / 2**30, 3)
                )
            if self.prof is not None and state.global_step == profile_from + profile_steps:
                wall = time.perf_counter() - self.prof_t0
                self.prof.__exit__(None, None, None)
                record["gpu_busy_share"] = round(_busy_seconds(self.prof) / wall, 4)
                record["profiled_steps"] = profile_steps
                record["top_kernels"] = _top_kernels(self.prof, profile_steps)
                self.prof = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append(round(float(logs["loss"]), 5))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if cuda:
                record["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if model is not None:
                record["lora_b_trained"] = _lora_b_trained(model)

    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StepTimer())
        self.data_collator = _Counting(self.data_collator, counts)
        record["trainer"] = self

    transformers.Trainer.__init__ = init


def _lora_b_trained(model) -> dict[str, list[int]]:
    """[adapters whose B moved off its zero start, adapters] for the vision tower and the rest. A B that
    never moved never got a gradient: that part of the recipe was not trained, whatever the flags said."""
    import torch

    out = {"vision": [0, 0], "language": [0, 0]}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" not in name:
                continue
            part = (
                "vision"
                if any(k in name for k in ("visual.", "vision_tower", "vision_model"))
                else "language"
            )
            out[part][1] += 1
            out[part][0] += int(bool(param.detach().abs().max() > 0))
    return out


def _top_kernels(prof, steps: int, n: int = 30) -> list[list]:
    """The device kernels that took the most time: [name, ms per step, launches per step], plus a total row."""
    import torch

    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            entry = totals.setdefault(e.name[:120], [0.0, 0])
            entry[0] += (e.time_range.end - e.time_range.start) / 1e3
            entry[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    table = [[name, round(ms / steps, 2), round(count / steps, 1)] for name, (ms, count) in rows[:n]]
    table.append(
        [
            "(all kernels)",
            round(sum(v[0] for v in totals.values()) / steps, 2),
            sum(v[1] for v in totals.values()) / steps,
        ]
    )
    return table


def _busy_seconds(prof) -> float:
    """Seconds in which at least one kernel, copy or memset ran (merged intervals of device events)."""
    import torch

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e6


# --------------------------------------------------------------------------------------------------
# The three systems
# --------------------------------------------------------------------------------------------------


def _messages(record: dict, image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": record["instruction"]}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": record["response"]}]},
    ]


def run_visionft(args, record: dict) -> None:
    import yaml
    from visionft.job.cli import main

    tag = args.system.replace(":", "-")

    manifest = {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {"name": "e2e"},
        "spec": {
            "model": {
                "uri": str(args.model_dir),
                "loadIn4bit": not args.tiny,
                "maxSeqLength": args.max_seq_length,
            },
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
            "dataset": {"uri": str(args.data_dir), "format": "imagefolder"},
            "training": {
                "maxSteps": args.steps,
                "perDeviceBatchSize": args.batch,
                "learningRate": LR,
                "optimizer": "adamw_8bit",
                "gradientCheckpointing": args.checkpointing,
                "checkpointEverySteps": 100_000,
                "loggingSteps": 1,
                "seed": args.seed,
                "optimizations": True,
                "packing": True,
            },
            "output": {"uri": str(args.run_dir / f"{tag}-out"), "saveMethod": "lora"},
        },
    }
    path = args.run_dir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    record["checkpointing"] = args.checkpointing
    rc = main([str(path), "--work-dir", str(args.run_dir / f"{tag}-work")])
    if rc != 0:
        raise RuntimeError(f"visionft-train exited {rc}")
    summary = json.loads((args.run_dir / f"{tag}-out" / "run.json").read_text())
    record["graphs"] = summary.get("graphs")
    record["rows"] = summary.get("rows")


def _sft_config(args, **extra):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(args.run_dir / f"{args.system.replace(':', '-')}-out"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=LR,
        optim="adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        max_length=args.max_seq_length,
        use_cpu=not cuda,
        **extra,
    )


#: Turn markers of the stand-in templates of families whose markers vary by checkpoint (ArchSpec.chat None).
#: " ASSISTANT:" with its space: the byte-level stand-in tokenizes it so only after a space, as in the chat.
_TURNS = {
    "llava": ("USER:", " ASSISTANT:"),
    "llava_next": ("[INST]", "[/INST]"),
    "pixtral": ("[INST]", "[/INST]"),
}


def run_unsloth(args, record: dict) -> None:
    import unsloth
    from PIL import Image
    from trl import SFTTrainer
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator
    from visionft.model.architectures import get_arch_spec

    record["unsloth"] = unsloth.__version__
    model, tokenizer = FastVisionModel.from_pretrained(
        str(args.model_dir), load_in_4bit=True, use_gradient_checkpointing="unsloth", local_files_only=True
    )
    sys.path.insert(0, str(HERE))
    from qlora_step import unsloth_lora

    model = unsloth_lora(model, random_state=args.seed)
    FastVisionModel.for_training(model)
    images = args.data_dir / "train"
    chat = get_arch_spec(MODEL_TYPE.get(args.arch, args.arch)).chat  # where the turns start
    instruction, response = (chat.instruction, chat.response) if chat else _TURNS[args.arch]
    # Unsloth's notebooks hand SFTTrainer a list of {"messages": [...]} with PIL images inside.
    dataset: Any = [
        {"messages": _messages(r, Image.open(images / r["file_name"]).convert("RGB"))}
        for r in _records(args.data_dir)
    ]
    collator = UnslothVisionDataCollator(
        model,
        tokenizer,
        resize="max",
        train_on_responses_only=True,  # the answers only, as in the other two systems
        instruction_part=instruction,
        response_part=response,
    )
    config = _sft_config(
        args,
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    try:
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            data_collator=collator,
            train_dataset=dataset,
            args=config,
        )
    except TypeError as err:  # a TRL that takes datasets.Dataset only: the same records, images decoded
        if "Dataset" not in str(err):
            raise
        record["dataset_form"] = "datasets.Dataset"
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            data_collator=collator,
            train_dataset=_as_dataset(dataset),
            args=config,
        )
    trainer.train()


def _as_dataset(records: list[dict]):
    """``records`` as a ``datasets.Dataset`` whose images come back as PIL images and whose content parts
    carry only their own keys (a collator that looks for an ``image`` key must not see ``image: None``)."""
    from datasets import Dataset, Features, Image, List, Value

    part = {"type": Value("string"), "image": Image(), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(part)})})
    filled = [
        {
            "messages": [
                {"role": m["role"], "content": [{**dict.fromkeys(part), **c} for c in m["content"]]}
                for m in r["messages"]
            ]
        }
        for r in records
    ]

    def clean(batch):
        batch["messages"] = [
            [
                {
                    "role": m["role"],
                    "content": [{k: v for k, v in c.items() if v is not None} for c in m["content"]],
                }
                for m in messages
            ]
            for messages in batch["messages"]
        ]
        return batch

    return Dataset.from_list(filled, features=features).with_transform(clean)


def run_plain(args, record: dict) -> None:
    import torch
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    kwargs: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        from visionft.model.architectures import get_arch_spec
        from visionft.model.loading import quantization_config

        vision = get_arch_spec(MODEL_TYPE.get(args.arch, args.arch)).vision
        kwargs.update(
            quantization_config=quantization_config(4, torch.bfloat16, [vision, "lm_head"]),
            device_map={"": 0},
        )
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    processor = AutoProcessor.from_pretrained(args.model_dir)
    images = args.data_dir / "train"
    # TRL's prompt-completion form: the loss covers the answers only, as in the other two systems.
    rows = [
        {
            "prompt": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["instruction"]}]}
            ],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": r["response"]}]}],
            "images": [str(images / r["file_name"])],
        }
        for r in _records(args.data_dir)
    ]
    dataset = Dataset.from_list(rows).cast_column("images", [ImageFeature()])
    trainer = SFTTrainer(
        model=model, args=_sft_config(args), train_dataset=dataset, processing_class=processor
    )
    if MODEL_TYPE.get(args.arch, args.arch) == "mllama":
        trainer.data_collator = _FullCrossAttentionMask(trainer.data_collator, processor)
    trainer.train()


def system_seed(system: str) -> tuple[str, int]:
    """``"plain"`` -> ``("plain", SEED)``; ``"plain:2"`` -> ``("plain", SEED + 2)``: the same system again with
    another seed (LoRA init and data order), which measures the system's own run-to-run loss band."""
    kind, _, repeat = system.partition(":")
    if kind not in SYSTEMS or (repeat and not repeat.isdigit()):
        raise ValueError(f"unknown system {system!r}: one of {', '.join(SYSTEMS)}, optionally with ':N'")
    return kind, SEED + int(repeat or 0)


#: Steps at the end of the run over which the loss is averaged for the band (the curves of rows and of
#: padded batches see other samples per step, so only their level over several steps compares).
LOSS_TAIL = 10


def loss_band(results: list[dict], tail: int = LOSS_TAIL) -> dict[str, Any]:
    """Each system's mean loss over its last ``tail`` steps, the spread of the plain runs among themselves
    (the noise band: the largest difference between two plain runs of other seeds), and how far every
    other system is from the plain runs' mean. Empty where fewer than two plain runs finished."""
    means = {
        r["system"]: statistics.fmean(r["losses"][-tail:])
        for r in results
        if len(r.get("losses") or []) >= tail
    }
    plain = [v for k, v in means.items() if system_seed(k)[0] == "plain"]
    out: dict[str, Any] = {"tail_steps": tail, "means": {k: round(v, 4) for k, v in means.items()}}
    if len(plain) < 2:
        return out
    centre = statistics.fmean(plain)
    out["plain_band"] = round(max(plain) - min(plain), 4)
    out["from_plain"] = {k: round(v - centre, 4) for k, v in means.items() if system_seed(k)[0] != "plain"}
    out["within_band"] = {k: abs(d) <= out["plain_band"] for k, d in out["from_plain"].items()}
    return out


class _FullCrossAttentionMask:
    """TRL's prompt-completion collator keeps Mllama's ``cross_attention_mask`` of the prompts alone (the
    completions have no rows in it, and the prompts' left padding is not flushed out of it); this one
    rebuilds it from the batch's final ``input_ids`` with the processor's own rule, as the processor
    would on the whole text."""

    def __init__(self, collate, processor) -> None:
        self.collate = collate
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.max_tiles = processor.image_processor.max_image_tiles

    def __call__(self, examples):
        import torch
        from transformers.models.mllama import processing_mllama

        batch = self.collate(examples)
        if "cross_attention_mask" not in batch:
            return batch
        ids = batch["input_ids"]
        sparse = [
            processing_mllama.get_cross_attention_token_mask(row, self.image_token_id) for row in ids.tolist()
        ]
        tiles = [
            [int(t) for t in row[: len(masks)]]
            for row, masks in zip(batch["aspect_ratio_mask"].sum(-1).tolist(), sparse, strict=True)
        ]
        dense = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=tiles, max_num_tiles=self.max_tiles, length=int(ids.shape[1])
        )
        batch["cross_attention_mask"] = torch.as_tensor(dense)
        return batch


def worker(args) -> dict:
    record: dict = {
        "system": args.system,
        "arch": args.arch,
        "t0": float(os.environ["E2E_T0"]),
        "steps": [],
        "losses": [],
    }
    if system_seed(args.system)[0] == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    _install_timer(
        record,
        profile_from=max(args.steps - args.profile_steps, args.warmup),
        profile_steps=args.profile_steps,
    )
    kind, args.seed = system_seed(args.system)
    {"visionft": run_visionft, "unsloth": run_unsloth, "plain": run_plain}[kind](args, record)
    record.pop("trainer", None)
    return _summarise(record, args)


def _summarise(record: dict, args) -> dict:
    steps = record.pop("steps")
    record["n_steps"] = len(steps)
    if steps:
        record["first_step_s"] = round(steps[0]["t"], 2)
    # Steady state: after the warm-up steps, before the profiled ones.
    end = len(steps) - (args.profile_steps if record.get("profiled_steps") else 0)
    window = steps[args.warmup : end]
    if len(window) >= 2:
        wall = window[-1]["t"] - window[0]["t"]
        durations = [b["t"] - a["t"] for a, b in itertools.pairwise(window)]
        tokens = sum(s["tokens"] for s in window[1:])
        samples = sum(s["samples"] for s in window[1:])
        record["steady_steps"] = len(durations)
        record["s_per_step_median"] = round(statistics.median(durations), 4)
        record["samples_per_s"] = round(samples / wall, 3)
        record["real_tokens_per_s"] = round(tokens / wall, 1)
        record["samples_per_step"] = round(samples / len(durations), 3)
    record.pop("t0", None)
    return record


# --------------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------------


def _env_line() -> str:
    import platform

    import torch
    import transformers

    parts = [f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python={platform.python_version()}"]
    parts.append(f"card={torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    parts += [f"torch={torch.__version__}", f"transformers={transformers.__version__}"]
    for mod in ("triton", "peft", "trl", "bitsandbytes", "accelerate", "unsloth"):
        try:
            import importlib.metadata as md

            parts.append(f"{mod}={md.version(mod)}")
        except Exception:
            parts.append(f"{mod}=missing")
    return " ".join(parts)


def _table(results: list[dict]) -> list[str]:
    head = "| system | samples/s | real tokens/s | s/step | samples/step | GPU busy | graph replays | first step s | peak GiB | loss first→last | LoRA B trained (vision, language) |"
    lines = [head, "|---" * 11 + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['error']} | | | | | | | | | |")
            continue
        g = r.get("graphs") or {}
        share = f"{100 * g['replay_share']:.0f}%" if g.get("replay_share") is not None else "—"
        losses = r.get("losses") or []
        curve = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—"
        busy = f"{100 * r['gpu_busy_share']:.0f}%" if "gpu_busy_share" in r else "—"
        moved = r.get("lora_b_trained")
        trained = (
            f"{moved['vision'][0]}/{moved['vision'][1]}, {moved['language'][0]}/{moved['language'][1]}"
            if moved
            else "—"
        )
        lines.append(
            f"| {r['system']} | {r.get('samples_per_s', '—')} | {r.get('real_tokens_per_s', '—')} | "
            f"{r.get('s_per_step_median', '—')} | {r.get('samples_per_step', '—')} | {busy} | {share} | "
            f"{r.get('first_step_s', '—')} | {r.get('peak_alloc_gib', '—')} | {curve} | {trained} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2_5_vl", choices=ARCHS)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated; NAME:N runs NAME again with seed + N (plain,plain:1: plain's loss band)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6, help="steps before the steady state")
    parser.add_argument("--profile-steps", type=int, default=3, help="steady steps profiled at the end")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=400, help="samples in the generated dataset")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (CI)")
    parser.add_argument("--out", required=True, help="folder for the JSON and the log")
    parser.add_argument("--work", default=None, help="model folder, data and runs (default: OUT/work)")
    parser.add_argument("--timeout", type=int, default=560, help="seconds for all systems together")
    parser.add_argument(
        "--checkpointing",
        default="on",
        choices=["on", "offload"],
        help="visionft's training.gradientCheckpointing (Unsloth's recipe offloads its checkpoints)",
    )
    parser.add_argument(
        "--reserve", type=int, default=140, help="seconds kept back for each system still to run"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for system in args.systems.split(","):
        try:
            system_seed(system)  # refuses a name that is no system before anything runs
        except ValueError as err:
            parser.error(f"--systems: {err}")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    size = "tiny" if args.tiny else "full"
    args.model_dir = work / f"model-{args.arch}-{size}"
    args.data_dir = work / f"data-{size}-{args.samples}"
    args.run_dir = work / f"runs-{args.arch}-{size}"

    if args.worker:
        args.system = args.worker
        args.run_dir.mkdir(parents=True, exist_ok=True)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / f"e2e-{args.arch}.log", "a")  # noqa: SIM115
    deadline = time.monotonic() + args.timeout

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"# e2e {args.arch} {size}: {_env_line()}")
    for what, path, build in (
        ("model", args.model_dir, lambda: build_folder(args.arch, args.model_dir, args.tiny)),
        ("dataset", args.data_dir, lambda: build_dataset(args.data_dir, args.samples, args.tiny)),
    ):
        if not path.exists():
            t0 = time.perf_counter()
            build()
            say(f"built the {what} in {time.perf_counter() - t0:.1f} s: {path}")
    results = []
    systems = args.systems.split(",")
    for i, system in enumerate(systems):
        left = deadline - time.monotonic()
        budget = int(left - args.reserve * (len(systems) - i - 1))  # room for the systems still to run
        cmd = [sys.executable, __file__, "--worker", system, *sys.argv[1:]]
        env = dict(
            os.environ,
            E2E_T0=repr(time.time()),
            UNSLOTH_DISABLE_STATISTICS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget, 30), env=env)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            text = (
                (err.stdout or b"").decode(errors="replace")
                if isinstance(err.stdout, bytes)
                else str(err.stdout or "")
            )
            text += (
                (err.stderr or b"").decode(errors="replace")
                if isinstance(err.stderr, bytes)
                else str(err.stderr or "")
            )
            rc = f"timeout after {budget} s"
        log.write(f"\n## {system} rc={rc} wall={time.perf_counter() - t0:.1f}s\n{text[-20000:]}\n")
        found = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            result = json.loads(found[-1][len("RESULT ") :])
        elif "No module named 'unsloth'" in text:
            result = {"system": system, "error": "skipped: unsloth is not installed"}
        else:
            result = {"system": system, "error": f"failed (rc={rc})", "tail": text[-3000:]}
        results.append(result)
        say(f"{system}: {json.dumps({k: v for k, v in result.items() if k != 'tail'})}")
        if "tail" in result:
            say(result["tail"])
    band = loss_band(results)
    (out / f"e2e-{args.arch}.json").write_text(
        json.dumps(
            {"env": _env_line(), "args": sys.argv[1:], "results": results, "loss_band": band}, indent=1
        )
        + "\n"
    )
    say("")
    for line in _table(results):
        say(line)
    ours = next((r for r in results if r["system"] == "visionft" and "samples_per_s" in r), None)
    for r in results:
        if ours and r is not ours and r.get("samples_per_s"):
            say(f"visionft vs {r['system']}: {ours['samples_per_s'] / r['samples_per_s']:.2f}x samples/s")
    say(f"loss, mean of the last {band['tail_steps']} steps: {band['means']}")
    if "plain_band" in band:
        say(f"plain against itself: {band['plain_band']}; from the plain mean: {band['from_plain']}")
    log.close()


if __name__ == "__main__":
    main()
