"""QLoRA step benchmark of a random-weight Qwen2.5-VL-7B-shaped model: plain HF + bitsandbytes + PEFT,
this engine (the same stack + ``visionft.patching``), and optionally Unsloth and Liger-Kernel, each in
its own process, in one run on one GPU.

    python bench/qlora_step.py --workload headline --engines plain,engine,unsloth,liger \
        --model-dir /tmp/vft-qwen25vl-7b --log bench.log --json results.json

The model (8.29 B parameters, bf16, random weights, seed 0) and a stand-in processor are built once
into ``--model-dir`` and reused by every process. The processor's tokenizer is a byte-level BPE
with no merges (one token per byte, so sequence lengths are exact) whose 22 Qwen special tokens sit
at their real ids 151643-151664.

Every engine gets the same model folder, the same batch, LoRA r=16 / alpha=16 / dropout 0 on every
linear layer of vision and language (PEFT's ``all-linear``: lm_head excluded), the vision tower kept
in 16 bit (``llm_int8_skip_modules=["model.visual", "lm_head"]``), NF4 with double quantization for
the language model, non-reentrant gradient checkpointing, bf16 autocast and bitsandbytes'
8-bit AdamW (lr 2e-4). Each step is forward + backward + optimizer step; the loss is read every
step (a sync each engine pays alike). Reported: median s/step over the timed steps, tokens/s, peak
allocated and reserved memory since the model was loaded, the loss curve, and for the
throughput workloads MFU = 4 N T / (step time x 790 TFLOP/s).

Workloads (``--workload``):
    headline     1 x 1024 tokens, one 672x672 image (576 image tokens), 256 supervised tokens
    throughput   8 x 2048 tokens, one 896x896 image each (1024 image tokens), 512 supervised each
    longctx      1 x 8192 tokens, four 896x896 images (4096 image tokens), 1024 supervised
    varlen       8 samples of 2048, 1888, ..., 928 tokens (11,904 real, 16,384 padded), one 672x672
                 image each, 256 supervised each. plain and unsloth get the right-padded batch;
                 engine and graphs get the same samples packed into one row of 11,904 tokens
                 (``visionft.data.packing``: block-diagonal attention, no padding). Both objectives
                 are the mean over the same 2,048 supervised tokens, so the loss curves compare;
                 tokens/s and MFU count real tokens only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from worker_process import BenchLog, offline_env, print_result, run_process

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643
PEAK_BF16_FLOPS = 790e12

WORKLOADS = {
    "headline": {"batch": 1, "tokens": 1024, "images": 1, "side": 672, "supervised": 256},
    "throughput": {"batch": 8, "tokens": 2048, "images": 1, "side": 896, "supervised": 512},
    "longctx": {"batch": 1, "tokens": 8192, "images": 4, "side": 896, "supervised": 1024},
    "varlen": {
        "batch": 8,
        "tokens": [2048 - 160 * i for i in range(8)],
        "images": 1,
        "side": 672,
        "supervised": 256,
        "packed": True,
    },
}

#: Engines that train on packed rows where the workload is packed (the others get the padded batch).
PACKING_ENGINES = ("engine", "graphs")


# --------------------------------------------------------------------------------------------------
# Model folder: config, random weights, stand-in processor
# --------------------------------------------------------------------------------------------------


def build_processor():
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from visionft.model.compat import image_processor_class
    from visionft.testing.chat_templates import chatml

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for i in range(len(vocab), FIRST_SPECIAL_ID):  # unused fillers, so the specials land at their real ids
        vocab[f"unused{i}"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN_SPECIALS)
    template = chatml("<|vision_start|><|image_pad|><|vision_end|>", default_system=None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=template,
        add_bos_token=False,
        model_max_length=32768,
    )
    for i, tok in enumerate(QWEN_SPECIALS):
        assert tokenizer.convert_tokens_to_ids(tok) == FIRST_SPECIAL_ID + i, tok
    image_processor = image_processor_class("Qwen2VLImageProcessor")(
        patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=template,
    )


def build_model_folder(folder: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    processor = build_processor()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "hidden_act": "silu",
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "n_params.txt").write_text(str(n_params))
    tmp.rename(folder)


# --------------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------------


def make_batch(processor, workload: str, packed: bool = False):
    """The workload's batch on the GPU: right-padded rows, or (``packed``) one row without padding."""
    import numpy as np
    import torch
    from PIL import Image

    w = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    lengths = w["tokens"] if isinstance(w["tokens"], list) else [w["tokens"]] * w["batch"]

    def text(n):
        return "".join(rng.choice(letters, size=n))

    def sample(filler: int, answer: str):
        img = "<|vision_start|><|image_pad|><|vision_end|>" * w["images"]
        return f"<|im_start|>user\n{img}{text(filler)}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"

    images = [
        [
            Image.fromarray(rng.integers(0, 256, (w["side"], w["side"], 3), dtype=np.uint8))
            for _ in range(w["images"])
        ]
        for _ in range(w["batch"])
    ]
    answer = text(w["supervised"] - 2)
    probe = processor(text=[sample(0, answer)], images=[images[0]], return_tensors="pt")
    base = probe["input_ids"].shape[1]
    assert min(lengths) >= base, f"{workload}: images and answer alone take {base} tokens"
    texts = [sample(n - base, answer) for n in lengths]
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape == (w["batch"], max(lengths)), batch["input_ids"].shape
    real = batch["attention_mask"].sum(1).tolist()
    assert real == lengths, real
    labels = torch.full_like(batch["input_ids"], -100)
    for row, n in enumerate(lengths):
        labels[row, n - w["supervised"] : n] = batch["input_ids"][row, n - w["supervised"] : n]
    batch["labels"] = labels
    if packed:
        batch = _pack(batch, lengths)
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _pack(batch, lengths):
    """The padded batch's samples as one row, in visionft's packed format (``visionft.data.packing``)."""
    import torch
    from visionft.data.packing import mask_sample_starts, segment_layout

    per_token = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")
    packed = {
        k: torch.cat([batch[k][row, :n] for row, n in enumerate(lengths)])[None]
        for k in per_token
        if k in batch
    }
    layout = segment_layout(lengths)
    mask_sample_starts(packed["labels"], layout["packed_cu_seqlens"])
    packed["attention_mask"] = torch.ones_like(packed["input_ids"])
    packed.update({k: v for k, v in batch.items() if k not in per_token and k != "attention_mask"})
    return {**packed, **layout}


# --------------------------------------------------------------------------------------------------
# One engine, in its own process
# --------------------------------------------------------------------------------------------------


def _bnb_config():
    """NF4 with double quantization, vision tower and lm_head in 16 bit: what ``load_in_4bit`` gives."""
    import torch
    from visionft.model.loading import quantization_config

    return quantization_config(4, torch.bfloat16, ["model.visual", "lm_head"])


def _hf_peft(folder: Path, patch_liger: bool = False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    if patch_liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

        apply_liger_kernel_to_qwen2_5_vl()
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=_bnb_config(), dtype=torch.bfloat16, device_map={"": 0}
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    return model


def load_engine(engine: str, folder: Path):
    info: dict = {}
    if engine == "plain":
        return _hf_peft(folder), info
    if engine == "liger":
        import importlib.metadata as md

        info["liger_kernel"] = md.version("liger-kernel")
        return _hf_peft(folder, patch_liger=True), info
    if engine in ("engine", "graphs"):
        from visionft.patching import apply_optimizations

        model = _hf_peft(folder)
        report = apply_optimizations(model)
        info["patches"] = report.summary()
        return model, info
    if engine == "unsloth":
        import torch
        import unsloth
        from unsloth import FastVisionModel

        info["unsloth"] = unsloth.__version__
        model, _ = FastVisionModel.from_pretrained(
            str(folder),
            load_in_4bit=True,
            dtype=torch.bfloat16,
            local_files_only=True,
            use_gradient_checkpointing="unsloth",
        )
        model = unsloth_lora(model, random_state=0)
        FastVisionModel.for_training(model)
        return model, info
    raise ValueError(f"engine={engine!r}")


def unsloth_lora(model, random_state: int):
    """Unsloth's documented vision LoRA: r=16, alpha 16, no dropout, vision and language, attention and
    MLP, Unsloth's gradient checkpointing."""
    from unsloth import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=True,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        random_state=random_state,
        use_gradient_checkpointing="unsloth",
    )


def run_worker(args) -> dict:
    if args.engine == "unsloth":
        import unsloth  # noqa: F401
    import bitsandbytes as bnb
    import torch

    if args.deterministic:
        # Same kernels, fixed reduction orders (cuBLAS workspace set by the orchestrator before CUDA
        # starts); ops without a deterministic version warn and run as usual. cuDNN's attention
        # backward is one of those (the only warning in the first such run, which left plain HF 1.2%
        # away from itself), so SDPA uses flash attention, whose backward honours the flag.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.enable_cudnn_sdp(False)
    from transformers import AutoProcessor

    folder = Path(args.model_dir)
    t0 = time.perf_counter()
    model, info = load_engine(args.engine, folder)
    load_s = time.perf_counter() - t0
    model.train()
    processor = AutoProcessor.from_pretrained(folder)
    packed = bool(WORKLOADS[args.workload].get("packed")) and args.engine in PACKING_ENGINES
    batch = make_batch(processor, args.workload, packed=packed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.engine == "graphs":
        # The same 8-bit AdamW, without bitsandbytes' device sync after every parameter.
        from visionft.engine.optim import adamw_8bit

        opt = adamw_8bit(trainable, lr=2e-4)
    else:
        opt = bnb.optim.AdamW8bit(trainable, lr=2e-4)
    forward_backward = _forward_backward(args.engine, model, info)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses, opt_host = [], [], []
    for _ in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = forward_backward(batch)
        t_opt = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_host.append(time.perf_counter() - t_opt)
        losses.append(loss.item())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    timed = times[args.warmup :]
    # Host time of the optimizer call (its launches; the GPU runs them asynchronously).
    info["optimizer_host_s_median"] = round(statistics.median(opt_host[args.warmup :]), 4)
    if args.engine == "graphs":
        step = forward_backward.__self__  # type: ignore[attr-defined]
        n = max(step.replays, 1)
        info["cuda_graphs"] = {
            "captured": step.captured,
            "replays": step.replays,
            "eager": step.eager_steps,
            "host_s_per_step": {
                k: round(v / (n + step.eager_steps), 4) for k, v in step.host_seconds.items()
            },
            "capture_gib_alloc_peak_peak_alloc": [
                [round(x / 2**30, 3) for x in m] for m in step.capture_memory
            ],
        }
    kernels, busy = _profile_step(forward_backward, batch, opt) if args.profile else (None, None)
    step = statistics.median(timed)
    n_tokens = int(batch["attention_mask"].sum())  # real tokens: padding is not work done
    n_params = int((folder / "n_params.txt").read_text())
    return {
        "engine": args.engine,
        "workload": args.workload,
        "load_s": round(load_s, 1),
        "step_s_median": round(step, 4),
        "step_s_min": round(min(timed), 4),
        "step_s_max": round(max(timed), 4),
        "first_step_s": round(times[0], 2),
        "tokens_per_s": round(n_tokens / step, 1),
        "mfu": round(4 * n_params * n_tokens / (step * PEAK_BF16_FLOPS), 4),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "trainable_params": sum(p.numel() for p in trainable),
        "losses": [round(x, 5) for x in losses],
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens": n_tokens,
        "kernels_per_step": kernels,
        "gpu_busy_s": busy,
        "deterministic": bool(args.deterministic),
        "packed": packed,
        **info,
    }


def _forward_backward(engine: str, model, info: dict):
    """The step's forward + backward for ``engine``: a CUDA-graph replay for "graphs", else eager."""
    import torch

    if engine == "graphs":
        from visionft.engine.cuda_graphs import CudaGraphTrainStep
        from visionft.patching import patch_report

        step = CudaGraphTrainStep(model, patch_report(model), warmup=2)
        if step.disabled:
            raise RuntimeError(f"CUDA graphs unavailable: {step.disabled}")
        return step.__call__

    def eager(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    return eager


def _profile_step(forward_backward, batch, opt):
    """One extra step under the profiler: (CUDA kernels launched, seconds the GPU spent in them)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward_backward(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(
        e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in events
    )
    return len(events), round(busy_us / 1e6, 4)


# --------------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------------


def _env_line() -> str:
    import torch
    import transformers

    parts = [
        f"card={torch.cuda.get_device_name(0)}",
        f"torch={torch.__version__}",
        f"transformers={transformers.__version__}",
    ]
    for mod in ("triton", "peft", "bitsandbytes"):
        try:
            parts.append(f"{mod}={__import__(mod).__version__}")
        except Exception:
            parts.append(f"{mod}=missing")
    try:
        drv = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        parts.append(f"driver={drv}")
    except OSError:
        pass
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="headline", help=",".join(WORKLOADS) + " (comma-separated)")
    parser.add_argument("--engines", default="plain,engine,unsloth,liger")
    parser.add_argument("--model-dir", default="/tmp/vft-qwen25vl-7b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per engine process")
    parser.add_argument("--log", default="qlora_step.log")
    parser.add_argument("--json", default="qlora_step.json")
    parser.add_argument(
        "--profile", action="store_true", help="count kernels and GPU busy time of one extra step"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms in every engine (for loss-curve comparisons)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print_result(run_worker(args))
        return

    folder = Path(args.model_dir)
    log = BenchLog(args.log)
    say = log.say

    say(f"# qlora_step {time.strftime('%Y-%m-%d %H:%M:%S')} {_env_line()}")
    if not (folder / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import qlora_step as q; from pathlib import Path; q.build_model_folder(Path({str(folder)!r}))",
            ],
            check=True,
        )
        say(f"built {folder} in {time.perf_counter() - t0:.1f} s")
    results = []
    for workload in args.workload.split(","):
        for engine in args.engines.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "1",
                "--engine",
                engine,
                "--workload",
                workload,
                "--model-dir",
                str(folder),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            cmd += ["--profile"] if args.profile else []
            cmd += ["--deterministic"] if args.deterministic else []
            env = offline_env(UNSLOTH_DISABLE_STATISTICS="1")
            if args.deterministic:
                env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            t0 = time.perf_counter()
            res, out, rc = run_process(cmd, args.timeout, env)
            log.write(
                f"\n## {workload}/{engine} rc={rc} wall={time.perf_counter() - t0:.1f}s\n{out[-6000:]}\n"
            )
            if res is not None:
                results.append(res)
                say(json.dumps(res))
            else:
                results.append(
                    {"engine": engine, "workload": workload, "error": f"rc={rc}", "tail": out[-1500:]}
                )
                say(f"{workload}/{engine}: FAILED rc={rc}\n{out[-1500:]}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    say(
        "\n| workload | engine | s/step (median) | tokens/s | MFU | peak alloc GiB | peak reserved GiB | kernels/step | GPU busy s | loss[0] | loss[-1] | max rel. loss diff vs plain, first 20 steps (all steps) |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            say(f"| {r['workload']} | {r['engine']} | failed ({r['error']}) | | | | | | | | | |")
            continue
        plain = next(
            (
                p
                for p in results
                if p.get("engine") == "plain" and p["workload"] == r["workload"] and "losses" in p
            ),
            None,
        )
        diff = ""
        if plain:
            n = min(len(plain["losses"]), len(r["losses"]))
            rel = [abs(a - b) / abs(a) for a, b in zip(plain["losses"][:n], r["losses"][:n], strict=True)]
            diff = f"{max(rel[:20]):.2e} ({max(rel):.2e})"
        say(
            f"| {r['workload']} | {r['engine']} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.3f} | "
            f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {r.get('kernels_per_step')} | {r.get('gpu_busy_s')} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {diff} |"
        )
    log.close()


if __name__ == "__main__":
    main()
