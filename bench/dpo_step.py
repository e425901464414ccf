"""DPO step benchmark of a random-weight Qwen2.5-VL-7B-shaped QLoRA model: plain TRL ``DPOTrainer`` and this
engine's (``visionft.engine.dpo`` with ``visionft.patching``), each in its own process, on one GPU.

    python bench/dpo_step.py --model-dir /tmp/vft-qwen25vl-7b --log dpo.log --json dpo.json

The model folder is ``bench/qlora_step.py``'s (built there when missing: 8.29 B parameters, bf16, random
weights, its byte-level stand-in processor). Both engines get the same model, LoRA r=16 / alpha=16 /
dropout 0 on every linear layer (NF4 language model, vision tower and lm_head in 16 bit), non-reentrant
gradient checkpointing, bitsandbytes' 8-bit AdamW at lr 5e-6, beta 0.1 with the sigmoid loss, and the same
batch: one preference pair (a 672x672 image, a prompt of about 700 tokens, a chosen and a rejected answer
of 256 tokens each), encoded by ``visionft.data.preference.PreferenceCollator`` into two rows, chosen then
rejected. Each engine runs ``Trainer.train`` over ``--warmup + --steps`` steps on that batch; the timed part
of a step is from ``on_step_begin`` to ``on_step_end`` after a device sync (forward and backward of both
rows, the reference pass, the optimizer step).

- ``trl``: TRL as a user would run it on this model: its reference is a frozen copy of the adapter
  ("ref", TRL's handling of a PEFT model it is given), its adapters cast to bf16 on a quantized model, its
  reference pass switching activation checkpointing off and on around each batch.
- ``engine``: ``visionft.engine.dpo.VisionDPOTrainer``: the reference is the base with the adapters
  disabled (no copied adapter), fp32 adapters, the engine's kernels (RMSNorm, gated MLP, rotary, LoRA; not
  the fused cross-entropy, which DPO's log-probabilities do not use) and the sync-free 8-bit AdamW.

Reported per engine: median s/step, tokens/s (both rows' real tokens), peak allocated and reserved memory,
and the losses (step 1 is log 2 = 0.6931 for both: the policy equals the reference before any update).
``--tiny`` runs the same code on CPU with a tiny Qwen2.5-VL (no 4-bit, fp32), for the CPU test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from worker_process import BenchLog, offline_env, print_result, run_process

HERE = Path(__file__).resolve().parent
ENGINES = ("trl", "engine")


def _record(side: int, prompt_chars: int, answer_chars: int):
    """One preference pair of random text around a random image (seed 0)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    def text(n: int) -> str:
        return "".join(rng.choice(letters, size=n))

    return {
        "image": image,
        "instruction": text(prompt_chars),
        "chosen": text(answer_chars),
        "rejected": text(answer_chars),
    }


def _load(folder: Path, engine: str, tiny: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    if tiny:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    else:
        sys.path.insert(0, str(HERE))
        from qlora_step import _bnb_config

        model = AutoModelForImageTextToText.from_pretrained(
            folder, quantization_config=_bnb_config(), dtype=torch.bfloat16, device_map={"": 0}
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    report = None
    if engine == "engine" and not tiny:
        from visionft.job.preference import PATCHES_OFF
        from visionft.patching import apply_optimizations

        report = apply_optimizations(model, **PATCHES_OFF)
    return model, processor, report


def run_worker(args) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from visionft.data.preference import PreferenceCollator
    from visionft.engine.dpo import vision_dpo_trainer_class

    folder, tiny, engine = Path(args.model_dir), args.tiny, args.engine
    cuda = torch.cuda.is_available() and not tiny
    model, processor, report = _load(folder, engine, tiny)
    info: dict = {"patches": report.summary()} if report is not None else {}
    side, prompt_chars, answer_chars = (56, 40, 12) if tiny else (672, 120, 254)
    record = _record(side, prompt_chars, answer_chars)
    collator = PreferenceCollator(model, processor, max_seq_length=4096, max_image_pixels=side * side)
    batch = collator([record])
    tokens = int(batch["attention_mask"].sum())
    answer_tokens = batch["completion_mask"].sum(dim=1).tolist()

    class FixedBatch:
        """The one encoded pair, for every step."""

        def __call__(self, features):
            return {k: v.clone() for k, v in batch.items()}

    steps = args.warmup + args.steps
    dataset = datasets.Dataset.from_dict({"image": [record["image"]] * steps, "n": list(range(steps))})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    config = DPOConfig(
        output_dir=str(Path(args.work_dir) / engine),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        optim="adamw_bnb_8bit" if cuda else "adamw_torch",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,  # set on the model above, as both engines' users would
        seed=0,
    )
    kwargs = dict(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=FixedBatch(),
        processing_class=processor,
        callbacks=[Timer()],
    )
    if engine == "engine":
        trainer = vision_dpo_trainer_class()(**kwargs, patch_report=report)
    elif engine == "trl":
        trainer = DPOTrainer(**kwargs)
    else:
        raise ValueError(f"engine={engine!r}")
    info["adapters"] = sorted(model.peft_config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [
        entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry
    ]
    timed = times[args.warmup :]
    step = statistics.median(timed)
    result = {
        "engine": engine,
        "step_s_median": step,
        "tokens_per_s": tokens / step,
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "losses": losses,
        "reward_accuracies": [
            e["rewards/accuracies"] for e in trainer.state.log_history if "rewards/accuracies" in e
        ],
        **info,
    }
    if cuda:
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--model-dir", default="/tmp/vft-qwen25vl-7b")
    parser.add_argument("--work-dir", default="/tmp/vft-dpo-bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per engine process")
    parser.add_argument("--log", default="dpo_step.log")
    parser.add_argument("--json", default="dpo_step.json")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2.5-VL on CPU (the CPU test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print_result(run_worker(args))
        return

    folder = Path(args.model_dir)
    log = BenchLog(args.log)
    say = log.say
    if not (folder / "config.json").exists():
        if args.tiny:
            from visionft.testing.tiny import save_tiny_vlm

            save_tiny_vlm("qwen2_5_vl", folder)
        else:
            sys.path.insert(0, str(HERE))
            from qlora_step import build_model_folder

            build_model_folder(folder)
    say(f"# dpo_step {time.strftime('%Y-%m-%d %H:%M:%S')} model={folder} tiny={args.tiny}")
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--model-dir", str(folder)]
        cmd += ["--work-dir", args.work_dir, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--tiny"] if args.tiny else []
        result, out, rc = run_process(cmd, args.timeout, offline_env())
        log.write(f"\n## {engine} rc={rc}\n{out[-6000:]}\n")
        if result is not None:
            results.append(result)
            say(json.dumps(result))
        else:
            results.append({"engine": engine, "error": f"rc={rc}", "tail": out[-1500:]})
            say(f"{engine}: FAILED rc={rc}\n{out[-1500:]}")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    say("\n| engine | s/step (median) | tokens/s | peak alloc GiB | peak reserved GiB | loss[0] | loss[-1] |")
    say("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            say(f"| {r['engine']} | failed ({r['error']}) | | | | | |")
            continue
        say(
            f"| {r['engine']} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r.get('peak_alloc_gib', float('nan')):.2f} | {r.get('peak_reserved_gib', float('nan')):.2f} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
        )
    log.close()
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
