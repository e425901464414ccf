"""A small DDP training driver for ``test_ddp.py``: the public API + TRL's ``SFTTrainer`` on a tiny VLM.

Run once as a single process or under ``torchrun`` (gloo on CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer/engine/ddp_driver.py \
        --model DIR --out DIR --steps 6 --batch 2

Only rank 0 writes outputs: the checkpoints under ``OUT/checkpoints`` (through the Trainer, where every
other rank adds only its own RNG file to its checkpoint folder) and the adapter under ``OUT/adapter``
(gated on ``visionft.engine.distributed.is_main_process``, as ``visionft.job.run`` gates its own). Every rank writes
its test record, ``OUT/rank{r}.json`` (the logged per-step losses, the dataset indices each step's
micro-batch held, and the supervised-token counts). As in ``visionft.job.run``, every rank has the
``GatherRngStatesCallback`` and rank 0 alone the S3 upload callback (``--s3-output``), added after it.

``--separate-disks`` stands in for a multi-node run: rank ``r > 0`` gets its own Trainer output folder,
``OUT/node{r}/checkpoints``, for the per-rank files the Trainer writes there (its RNG state). ``--rng-probe``
makes each rank draw a rank-dependent amount of randomness every step (the ranks are seeded alike, so
their RNG states would otherwise be equal) and records digests of its RNG state at each save
(``rng_at_save``: step -> ``rng_digests``).

This is not the ``visionft-train`` CLI (``test_ddp.py`` runs that under torchrun too): it exercises the same
API, collator and trainer settings, and records per rank what the tests compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import TrainerCallback
from visionft import FastVisionModel
from visionft.data.collator import IGNORE_INDEX, VisionDataCollator
from visionft.engine import distributed as dist_utils
from visionft.engine.checkpoint_rng import GatherRngStatesCallback
from visionft.patching.rows import ROW_KEY
from visionft.testing.tiny import tiny_image

ARCH = "qwen2_vl"
#: (colour, answer); answers of one short word each so supervised-token counts stay close across samples.
COLOURS = [
    ((220, 30, 30), "red"),
    ((30, 30, 220), "blue"),
    ((30, 200, 30), "green"),
    ((20, 20, 20), "black"),
]


def record(i: int) -> dict:
    """Sample ``i``: a coloured square (position drawn from ``i``) and its colour as the answer.

    The dataset the Trainer shards holds only the index; the collator builds the record from it, so the
    images need no serialisation into an Arrow table.
    """
    colour, answer = COLOURS[i % len(COLOURS)]
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": tiny_image(ARCH, colour, seed=i)},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


class RecordingCollator:
    """Wraps the collator; remembers each micro-batch's dataset indices and supervised-token count."""

    def __init__(self, inner):
        self.inner = inner
        self.indices: list[list[int]] = []
        self.supervised: list[int] = []
        self.row_samples: list[int] = []

    def __getattr__(self, name: str):
        # A row collator's family, tiers and bad-sample counts, which the trainer and its prefetch read.
        return getattr(self.__dict__["inner"], name)

    def __call__(self, features):
        indices = [int(f["__index__"]) for f in features]
        self.indices.append(indices)
        batch = self.inner([record(i) for i in indices])
        self.supervised.append(int((batch["labels"] != IGNORE_INDEX).sum()))
        info = batch.get(ROW_KEY)
        if info is not None:
            self.row_samples.append(info.samples)
        return batch


def row_collator(model, inner: VisionDataCollator, samples: int, row_batch: int):
    """Fixed-shape rows (``visionft.data.row_collator``) around ``inner``, one tier-0 budget sized for
    ``row_batch`` samples with room to spare, so that every micro-batch fills exactly one row."""
    from visionft.data.row_collator import RowCollator
    from visionft.data.rows import plan_tiers
    from visionft.patching.rows import enable_rows

    family = enable_rows(model, inner.pad_token_id)
    sizes = [family.sample_size(inner.encode(record(i))) for i in range(samples)]
    bounds = family.plan_kwargs(inner.max_seq_length)
    tiers = plan_tiers(sizes, row_batch, max_sample_tokens=inner.max_seq_length, margin=0.5, **bounds)
    return RowCollator(inner, family, tiers, pin=False)


def rng_digests(states: dict) -> dict[str, str]:
    """Digests of an RNG state dict as the Trainer saves it (``python``, ``numpy``, ``cpu`` keys)."""
    _, keys, pos, has_gauss, cached = states["numpy"]
    parts = {
        "python": repr(states["python"]).encode(),
        "numpy": np.asarray(keys).tobytes() + repr((int(pos), int(has_gauss), float(cached))).encode(),
        "cpu": states["cpu"].numpy().tobytes(),
    }
    return {k: hashlib.sha256(v).hexdigest() for k, v in parts.items()}


class RngProbe(TrainerCallback):
    """Draws ``rank + 1`` numbers from each RNG per step; records this rank's RNG digests at each save."""

    def __init__(self) -> None:
        self.at_save: dict[int, dict[str, str]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        n = dist_utils.rank() + 1
        torch.rand(n)
        np.random.rand(n)
        for _ in range(n):
            random.random()

    def on_save(self, args, state, control, **kwargs):
        now = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        self.at_save[state.global_step] = rng_digests(now)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="per-device batch size")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--separate-disks", action="store_true", help="ranks > 0 keep checkpoints in OUT/node{r}")
    p.add_argument("--rng-probe", action="store_true", help="rank-dependent draws; RNG digests at saves")
    p.add_argument("--s3-output", help="rank 0 uploads checkpoints under this s3:// output prefix")
    p.add_argument(
        "--trainer",
        choices=["trl", "visionft"],
        default="trl",
        help="TRL's SFTTrainer (DDP's hooks), or visionft's (optimizations on: one flat all-reduce per step)",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=0,
        help="fixed-shape rows (visionft's trainer only), their budget sized for this many samples (0: none)",
    )
    a = p.parse_args()
    if a.rows and a.trainer != "visionft":
        p.error("--rows needs --trainer visionft (rows run only through visionft's row forward)")

    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    dist_utils.setup()  # the group exists before the Trainer, as visionft.job.run would do it
    out = Path(a.out)
    local = out if dist_utils.is_main_process() or not a.separate_disks else out / f"node{dist_utils.rank()}"
    model, processor = FastVisionModel.from_pretrained(
        a.model, load_in_4bit=False, device_map=dist_utils.device_map()
    )
    model = FastVisionModel.get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing=True, random_state=a.seed
    )
    patch_report = None
    if a.trainer == "visionft":
        from visionft import patching

        patch_report = patching.apply_optimizations(model, optimizations=True)
    inner = VisionDataCollator(model, processor, max_seq_length=512)
    collator = RecordingCollator(row_collator(model, inner, a.samples, a.rows) if a.rows else inner)
    args = SFTConfig(
        output_dir=str(local / "checkpoints"),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=a.seed,
        data_seed=a.seed,
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        gradient_checkpointing=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        report_to="none",
        use_cpu=True,
        **dist_utils.ddp_training_kwargs(),
    )
    probe = RngProbe()
    callbacks: list = [probe] if a.rng_probe else []
    if dist_utils.is_distributed():
        callbacks.append(GatherRngStatesCallback())
    trainer_class, engine = SFTTrainer, {}
    if a.trainer == "visionft":
        from visionft.engine.options import EngineOptions
        from visionft.engine.trainer import vision_sft_trainer_class

        trainer_class = vision_sft_trainer_class()
        engine = {"engine_options": EngineOptions.resolve(optimizations=True), "patch_report": patch_report}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"__index__": list(range(a.samples))}),
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        **engine,
    )
    if a.s3_output and dist_utils.is_main_process():
        from visionft import storage

        trainer.add_callback(storage.checkpoint_callback(a.s3_output, out / "checkpoints"))
    resume = None
    if a.resume:
        done = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[-1]))
        resume = str(done[-1]) if done else None
    trainer.train(resume_from_checkpoint=resume)

    grads_reduced = sorted(
        n for n, q in model.named_parameters() if q.requires_grad
    )  # what DDP's reducer covers
    record = {
        "rank": dist_utils.rank(),
        "world_size": dist_utils.world_size(),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "steps": [e["step"] for e in trainer.state.log_history if "loss" in e],
        "indices": collator.indices,
        "supervised": collator.supervised,
        "global_step": trainer.state.global_step,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "trainable": len(grads_reduced),
        "all_trainable_are_lora": all("lora_" in n for n in grads_reduced),
        "ddp_reduced_params": dist_utils.ddp_reduced_parameter_count(trainer.model_wrapped),
        "resumed_from": resume,
        "rng_at_save": probe.at_save,
        "flat_allreduce_calls": getattr(getattr(trainer, "_grad_sync", None), "calls", None),
        "row_samples": collator.row_samples,
        "row_summary": trainer.row_summary() if hasattr(trainer, "row_summary") else None,
    }
    (out / f"rank{dist_utils.rank()}.json").write_text(json.dumps(record, indent=1))
    if dist_utils.is_main_process():
        model.save_pretrained(str(out / "adapter"))
    dist_utils.barrier()


if __name__ == "__main__":
    main()
