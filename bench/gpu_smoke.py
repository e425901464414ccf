"""GPU acceptance smoke test: 4-bit load, LoRA and 10 steps on a ~2B-shaped random Qwen2.5-VL.

Run on the GPU host (not in CI):

    HF_HUB_OFFLINE=1 python bench/gpu_smoke.py --out /tmp/gpu-smoke

It builds a random-weight Qwen2.5-VL with the 3B model's language shape cut to ~2B parameters
(hidden 2048, 28 layers) and the real 32-block vision tower, and a stand-in processor from
``visionft.testing.tiny`` (a small BPE vocabulary; the embedding is sized to the real 151,936 ids
so the memory footprint is realistic). It then loads the saved folder through
``FastVisionModel.from_pretrained(load_in_4bit=True)``, adds LoRA on vision and language, trains
10 steps, checks the loss is finite, saves the adapters, reloads them with plain PEFT on a fresh
4-bit base, and prints one JSON line with the timings and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def build_folder(out: Path) -> Path:
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
    from visionft.testing.tiny import build_tiny_processor

    processor = build_tiny_processor("qwen2_5_vl")
    # Real-sized images: 28 px factor, up to 448x448 -> 256 merged image tokens.
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    ids = dict(processor.tokenizer.get_added_vocab())
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    folder = out / "base"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/visionft-gpu-smoke"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this smoke test needs a CUDA GPU"

    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from visionft import FastVisionModel
    from visionft.model.loading import quantization_config

    t0 = time.perf_counter()
    folder = build_folder(args.out)
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, processor = FastVisionModel.from_pretrained(folder, load_in_4bit=True, max_seq_length=2048)
    t_load = time.perf_counter() - t0
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)
    FastVisionModel.for_training(model)

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Write the LaTeX for this image."}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "\\frac{a}{b} + x^2 = \\sqrt{y}"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    image = Image.new("RGB", (448, 336), (250, 250, 250))
    batch = processor(text=[text], images=[[image]], return_tensors="pt").to("cuda")
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], time.perf_counter()
    for _ in range(args.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    assert all(math.isfinite(x) for x in losses), losses

    FastVisionModel.for_inference(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        reference = model(**inputs).logits.float()
    model.save_pretrained(args.out / "lora")
    del model
    torch.cuda.empty_cache()
    base = AutoModelForImageTextToText.from_pretrained(
        folder,
        device_map={"": 0},
        dtype=torch.bfloat16,
        quantization_config=quantization_config(
            4, torch.bfloat16, ["model.visual.patch_embed", "model.visual.merger", "lm_head"]
        ),
    )
    reloaded = PeftModel.from_pretrained(base, args.out / "lora").eval()
    with torch.no_grad():
        diff = (reloaded(**inputs).logits.float() - reference).abs().max().item()

    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "build_s": round(t_build, 1),
                "load_4bit_s": round(t_load, 1),
                "train_steps": args.steps,
                "train_s": round(t_train, 2),
                "step_s_mean": round(t_train / max(args.steps, 1), 3),
                "losses": [round(x, 4) for x in losses],
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "seq_len": int(batch["input_ids"].shape[1]),
                "reload_max_abs_logit_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
