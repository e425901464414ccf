"""Fixed-budget rows on the data side: the best-fit packer (every sample trained once, budgets kept, the
oldest first, the larger tier for oversize samples and backlogs), the budgets the layout study chose
(``bench/layout_choice.py``: fill and signatures on the generated varied dataset), the prefetch thread
(order, errors, and exact bad-sample counts when a run stops early), and ``visionft-train`` with
``training.packing`` on a tiny Qwen2.5-VL (rows in run.json, the loss falls)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from visionft.data.collator import VisionDataCollator
from visionft.data.prefetch import Prefetching
from visionft.data.rows import RowBudget, RowPacker, RowTiers, SampleSize, plan_tiers, simulate

ROOT = Path(__file__).resolve().parents[3]


def _layout_choice():
    spec = importlib.util.spec_from_file_location("layout_choice", ROOT / "bench" / "layout_choice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["layout_choice"] = module
    spec.loader.exec_module(module)
    return module


def test_the_packer_trains_every_sample_once_within_the_budgets():
    gen = torch.Generator().manual_seed(0)
    sizes = [
        SampleSize(int(t), int(p), 1)
        for t, p in zip(
            torch.randint(20, 400, (300,), generator=gen),
            torch.randint(0, 300, (300,), generator=gen),
            strict=True,
        )
    ]
    tiers = plan_tiers(sizes[:64], batch_size=4, max_sample_tokens=400, max_sample_patches=300)
    packer: RowPacker[int] = RowPacker(tiers)
    seen: list[int] = []
    for step, start in enumerate(range(0, len(sizes), 4)):
        packer.add((i, sizes[i]) for i in range(start, start + 4))
        row = packer.take()
        assert row is not None
        budget = tiers.tiers[row.tier]
        used = row.used()
        assert used.tokens <= budget.tokens and used.patches <= budget.patches
        assert len(row.items) <= budget.samples and row.items == sorted(row.items)  # row order = age
        # The oldest buffered sample always goes first, so nothing waits long.
        assert min(row.items) // 4 >= step - 20
        seen += row.items
    while (row := packer.take()) is not None:
        seen += row.items
    assert sorted(seen) == list(range(len(sizes)))


def test_oversize_samples_and_backlogs_take_the_larger_tier():
    small, large = RowBudget(100, 50, 4, 8, 200), RowBudget(200, 100, 4, 8, 200)
    packer: RowPacker[str] = RowPacker(RowTiers((small, large), batch_size=2, drain_after=3))
    packer.add([("big", SampleSize(150, 10, 1))])
    assert packer.take().tier == 1
    packer.add([(str(i), SampleSize(90, 10, 1)) for i in range(4)])  # 4 buffered > drain_after
    assert packer.take().tier == 1
    assert packer.take().tier == 0
    with pytest.raises(ValueError, match="larger than a row"):
        packer.add([("huge", SampleSize(250, 10, 1))])


def test_the_chosen_budgets_fill_most_of_each_row_with_one_or_two_signatures():
    study = _layout_choice()
    for arch, tier1_share in (("qwen2_5_vl", 0.15), ("gemma3", 0.05)):
        sizes = study.sizes_for(arch, 2000)
        gemma = arch == "gemma3"
        tiers = plan_tiers(
            sizes[:256],
            4,
            max_sample_tokens=2048,
            patches_per_image=4096 if gemma else None,
            max_sample_patches=None if gemma else 4 * 2048,
        )
        stats = simulate(sizes, tiers)
        assert stats.token_fill > 0.85 and stats.patch_fill > 0.85, (arch, stats)
        assert stats.tier_counts[1] <= tier1_share * stats.steps, (arch, stats)
        assert 3.9 <= stats.samples_per_row <= 4.0 and stats.left_over < 30, (arch, stats)
        # What plain HF / Unsloth compute: each batch padded to its longest sample.
        assert study.padded(sizes, 4)["token_fill"] < stats.token_fill


def test_prefetching_keeps_order_raises_in_place_and_takes_back_counts_of_batches_not_trained(tmp_path):
    from visionft.testing.tiny import build_tiny_vlm, tiny_image

    model, processor = build_tiny_vlm("qwen2_vl")
    collator = VisionDataCollator(model, processor, on_bad_sample="skip")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    tiny_image("qwen2_vl").save(tmp_path / "good.png")

    def record(i: int) -> dict:
        image = str(tmp_path / ("bad.png" if i % 3 == 2 else "good.png"))
        return {
            "__index__": i,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]},
            ],
        }

    loader = torch.utils.data.DataLoader([record(i) for i in range(24)], batch_size=3, collate_fn=collator)
    prefetching = Prefetching(loader, collator, depth=3)
    assert len(prefetching) == 8
    taken = []
    for batch in prefetching:
        taken.append(batch["input_ids"].shape[0])
        if len(taken) == 3:
            break  # the run's last step: batches built ahead were never trained
    prefetching.close()
    assert taken == [2, 2, 2]
    assert collator.skipped == 3  # one bad sample in each of the 3 trained batches, none of the others

    def failing(features):
        if features[0]["__index__"] >= 6:
            raise RuntimeError("collate failed")
        return len(features)

    loader = torch.utils.data.DataLoader([record(i) for i in range(12)], batch_size=3, collate_fn=failing)
    got = []
    with pytest.raises(RuntimeError, match="collate failed"):
        for n in Prefetching(loader, None):
            got.append(n)
    assert got == [3, 3]


def test_visionft_train_with_packing_trains_on_fixed_rows(tmp_path, tiny_dir):
    import yaml
    from visionft.data.synthetic import make_shapes_dataset
    from visionft.job.cli import main

    data = tmp_path / "shapes"
    make_shapes_dataset(data, train_size=64, test_size=4, image_size=56)
    raw = {
        "model": {"uri": str(tiny_dir("qwen2_5_vl")), "loadIn4bit": False, "maxSeqLength": 256},
        "lora": {"r": 16, "alpha": 16},
        "dataset": {"uri": str(data), "format": "auto"},
        "training": {
            "maxSteps": 24,
            "perDeviceBatchSize": 4,
            "learningRate": 5e-3,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": "off",
            "checkpointEverySteps": 100,
            "loggingSteps": 4,
            "optimizations": False,
            "packing": True,
        },
        "output": {"uri": str(tmp_path / "out"), "saveMethod": "lora"},
        "runtime": {"workDir": str(tmp_path / "work")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    rows = summary["rows"]
    assert rows["rows"] == 24 and sum(rows["tier_rows"]) == 24
    assert 3.0 <= rows["samples_per_row"] <= 5.0 and rows["token_fill"] > 0.6
    assert summary["graphs"]["eager_steps"] == 24 and summary["graphs"]["off"]  # CPU: rows run eagerly
    state = json.loads(
        next((tmp_path / "out" / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text()
    )
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses
