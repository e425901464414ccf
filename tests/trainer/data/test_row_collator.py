"""``RowCollator`` on tiny models, on CPU: a sample with more images than the largest planned row holds
(the probe of the dataset saw none so large) is not dropped but trained in a row of its own, grown to
it, with the loss and LoRA gradients of that sample trained alone; the rows after it are the planned
ones, and the row statistics count it apart."""

from __future__ import annotations

import pytest
import torch
from visionft.data.collator import VisionDataCollator
from visionft.data.row_collator import RowCollator, RowStats
from visionft.data.rows import plan_tiers
from visionft.patching import revert_optimizations
from visionft.patching.rows import ROW_KEY, enable_rows
from visionft.testing.lora import tiny_lora
from visionft.testing.tiny import build_tiny_vlm, open_image_paths

from tests.patching.test_packed_attention import _image, _sample
from tests.patching.test_rows import _row_loss_and_grads, _unpacked_loss_and_grads


def _three_images() -> dict:
    record = _sample("three boxes, red, green and blue", _image((56, 56), (220, 30, 30)))
    content = record["messages"][0]["content"]
    content[1:1] = [
        {"type": "image", "image": _image((56, 56), (30, 220, 30))},
        {"type": "image", "image": _image((56, 56), (30, 30, 220))},
    ]
    return record


# Families whose vision budget counts whole images (the others bound their budgets by the tokens a
# sample may have, so no sample outgrows them).
@pytest.mark.parametrize("arch", ["gemma3", "llava", "mllama"])
def test_a_sample_larger_than_every_row_trains_in_a_row_of_its_own(arch):
    model, processor = build_tiny_vlm(arch, seed=0)
    model.train()
    open_image_paths(model)
    model = tiny_lora(model, torch.Generator().manual_seed(1))
    collator = VisionDataCollator(model, processor)
    family = enable_rows(model, collator.pad_token_id, fused=False)
    singles = [_sample(f"answer {i}", _image((56, 56), (40 * i, 90, 90))) for i in range(4)]
    sizes = [family.sample_size(collator.encode(s)) for s in singles]
    tiers = plan_tiers(sizes, batch_size=1, max_sample_tokens=256, **family.plan_kwargs(256))
    big = _three_images()
    big_size = family.sample_size(collator.encode(big))
    assert big_size.images == 3 > tiers.largest().images, (big_size, tiers)

    rows = RowCollator(collator, family, tiers, pin=False)
    first_ids = collator.encode(singles[0])["input_ids"]
    first = rows([singles[0], big])
    info = first[ROW_KEY]
    assert info.tier == tiers.overflow_tier and info.samples == 1
    assert info.budget.images == 3 and collator.skipped == 0
    loss, grads = _row_loss_and_grads(model, family, first)
    loss_alone, grads_alone = _unpacked_loss_and_grads(model, collator, [collator.encode(big)])
    torch.testing.assert_close(loss, loss_alone, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_alone.keys()
    for name, g in grads_alone.items():
        err = (grads[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"

    second = rows([singles[1]])  # the sample that waited comes next, in a planned tier
    assert second[ROW_KEY].tier < tiers.overflow_tier and second[ROW_KEY].samples >= 1
    assert torch.equal(second["input_ids"][0, : first_ids.shape[1]], first_ids[0])
    stats = RowStats(tiers)
    for row in (first, second):
        stats.add(row[ROW_KEY])
    summary = stats.summary()
    assert summary["rows"] == 2 and summary["overflow_rows"] == 1 and sum(summary["tier_rows"]) == 1
    revert_optimizations(model)
