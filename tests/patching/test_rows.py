"""Fixed-shape rows (``visionft.patching.rows``, ``visionft.data.rows``) on tiny models, on CPU: a row's
loss and every LoRA gradient equal those of the same samples trained unpacked (a padded batch through
the plain model), the same with activation checkpointing; a row with its layout broken on purpose
(samples seeing each other, features in the wrong place, windows out of order) does not; the forward
and backward read nothing from the device and have no data-dependent shape (``CaptureSafety``), with
the same op sequence and shapes for two rows of different samples; and the plain forward fails that
check (the control). The CUDA capture: test_rows_gpu.py."""

from __future__ import annotations

import pytest
import torch
from visionft.data.collator import VisionDataCollator
from visionft.data.rows import plan_tiers
from visionft.patching import revert_optimizations
from visionft.patching.rows import ROW_KEY, enable_rows
from visionft.testing.capture_safety import CaptureSafety, CaptureUnsafe
from visionft.testing.lora import tiny_lora
from visionft.testing.tiny import build_tiny_vlm, open_image_paths

from tests.patching.test_packed_attention import _image, _sample

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "llava_next", "pixtral", "mllama"]
#: fp32 on CPU: the row and the padded batch compute the same sums in different orders.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_REL_TOL = 1e-4


SAMPLES = [
    _sample("red", _image((56, 56), (220, 30, 30))),
    _sample("a wide green box", _image((112, 56), (30, 220, 30))),
    _sample("no image, just text"),
    _sample("blue and tall, taller than wide", _image((84, 112), (30, 30, 220))),
    _sample("a big one", _image((112, 112), (200, 200, 30))),
    # Longer than the tiny Gemma 3's sliding window (64 tokens): the local layers' window matters.
    _sample(" ".join(["a long answer that keeps going"] * 4), _image((70, 56), (90, 90, 200))),
]


def _two_images() -> dict:
    """A sample with a wide and a tall image, both letterboxed by their grid (LLaVA-NeXT unpads them)."""
    sample = _sample("a wide one, then a tall one", _image((84, 70), (30, 200, 200)))
    sample["messages"][0]["content"].insert(1, {"type": "image", "image": _image((70, 84), (200, 30, 200))})
    return sample


#: Samples an architecture's rows hold on top of ``SAMPLES``: several images in one sample, so that an
#: image's features are laid out after those of another image of its own sample.
EXTRA_SAMPLES = {"llava_next": [_two_images()], "mllama": [_two_images()]}
#: Architectures whose reference is each sample in a batch of its own: Mllama's padded batch lets a
#: text-only sample's tokens attend to the other samples' empty image slots, so it depends on the batch.
ALONE_REFERENCE = {"mllama"}


def _setup(arch: str, checkpointing: bool = False, fused: bool = False):
    """Model, collator, row family, encoded samples and budgets. ``fused``: the row forward's Triton
    kernels (on CPU through the slow interpreter), as with the optimizations on; off by default."""
    model, processor = build_tiny_vlm(arch, seed=0)
    model.train()
    open_image_paths(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = tiny_lora(model, torch.Generator().manual_seed(1))
    collator = VisionDataCollator(model, processor)
    encoded = [collator.encode(s) for s in SAMPLES + EXTRA_SAMPLES.get(arch, [])]
    family = enable_rows(model, collator.pad_token_id, fused=fused)
    sizes = [family.sample_size(e) for e in encoded]
    tiers = plan_tiers(sizes, batch_size=len(sizes), max_sample_tokens=256, **family.plan_kwargs(256))
    return model, collator, family, encoded, tiers


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _row_loss_and_grads(model, family, row):
    batch = dict(row)
    info = batch.pop(ROW_KEY)
    tensors = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
    model.zero_grad(set_to_none=True)
    loss = family.forward(model, tensors, info)
    loss.backward()
    return loss.detach(), _grads(model)


def _unpacked_loss_and_grads(model, collator, encoded):
    model.zero_grad(set_to_none=True)
    if model.config.model_type not in ALONE_REFERENCE:
        out = model(**collator.pad(encoded))
        out.loss.backward()
        return out.loss.detach(), _grads(model)
    counts = [int((e["labels"][0, 1:] != -100).sum()) for e in encoded]
    total = torch.zeros(())
    for sample, count in zip(encoded, counts, strict=True):
        loss = model(**collator.pad([sample])).loss * (count / sum(counts))
        loss.backward()
        total = total + loss.detach()
    return total, _grads(model)


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert grads.keys() == ref_grads.keys() and ref_grads and all("lora_" in n for n in ref_grads)
    for name, g in ref_grads.items():
        err = (grads[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < GRAD_REL_TOL, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_row_gives_the_unpacked_loss_and_every_lora_gradient(arch, checkpointing):
    model, collator, family, encoded, tiers = _setup(arch, checkpointing)
    row = family.assemble(encoded, tiers.tiers[0], 0)
    assert row["input_ids"].shape == (1, tiers.tiers[0].tokens)
    assert row["pixel_values"].shape[0] in (tiers.tiers[0].patches, tiers.tiers[0].images)
    assert row[ROW_KEY].real_tokens < tiers.tiers[0].tokens  # the row has padding to fill
    loss, grads = _row_loss_and_grads(model, family, row)
    ref_loss, ref_grads = _unpacked_loss_and_grads(model, collator, encoded)
    _assert_same(loss, grads, ref_loss, ref_grads)
    # The larger tier (more padding, same samples) gives the same numbers.
    loss1, grads1 = _row_loss_and_grads(model, family, family.assemble(encoded, tiers.tiers[1], 1))
    _assert_same(loss1, grads1, ref_loss, ref_grads)
    revert_optimizations(model)


def _break(row: dict, how: str) -> dict:
    row = dict(row)
    info = row[ROW_KEY]
    if how == "one-text-segment" and "segment_ids" in row:  # every sample sees the ones before it
        row["segment_ids"] = torch.zeros_like(row["segment_ids"])
    elif how == "one-text-segment":
        cu = torch.full_like(row["text_cu_seqlens"], info.budget.tokens)
        cu[0] = 0
        row["text_cu_seqlens"] = cu
    elif how == "images-causal":  # image tokens no longer see the later tokens of their image
        row["image_blocks"] = torch.full_like(row["image_blocks"], -1)
    elif how == "features-shifted":  # each image feature lands one image token later
        pos = row["image_positions"].clone()
        real = pos < info.budget.tokens
        pos[real] = torch.roll(pos[real], 1)
        row["image_positions"] = pos
    elif how == "one-vision-segment":  # the images of a row attend to each other in the tower
        cu = torch.full_like(row["vision_cu_seqlens"], info.budget.patches)
        cu[0] = 0
        row["vision_cu_seqlens"] = cu
    elif how == "vision-positions-transposed":  # each patch's (row, column) read as (column, row)
        row["vision_position_ids"] = row["vision_position_ids"].flip(-1)
    elif how in ("tiles-swapped", "newline-misplaced"):
        row["image_sources"] = _broken_sources(row, how)
    elif how == "cross-sees-another-image":  # each image slot is also seen by the next image's tokens
        row["cross_tiles"] = row["cross_tiles"] | torch.roll(row["cross_tiles"], 1, dims=2)
    elif how == "cross-rows-unmasked":  # tokens before their sample's first image get the MLP output
        row["cross_rows"] = torch.ones_like(row["cross_rows"])
    elif how == "windows-in-raster-order":
        row["window_index"] = torch.arange(row["window_index"].shape[0])
    else:
        raise ValueError(how)
    return row


def _broken_sources(row: dict, how: str) -> torch.Tensor:
    """LLaVA-NeXT's gather index broken: ``"tiles-swapped"`` reads each feature from the neighbouring tile
    (tile ``t`` from ``t ^ 1``: an image's base tile and its first grid tile trade places), and
    ``"newline-misplaced"`` puts every newline one feature earlier in its image."""
    info = row[ROW_KEY]
    sources = row["image_sources"].clone()
    newline = int(sources[-1])  # the row has padding slots, and they read the newline
    real = int((row["image_positions"] < info.budget.tokens).sum())
    if how == "tiles-swapped":
        per_tile = newline // info.int("tiles")
        tile, patch = sources // per_tile, sources % per_tile
        other = tile ^ 1
        moved = (sources < newline) & (other < info.int("tiles"))
        return torch.where(moved, other * per_tile + patch, sources)
    for i in (sources[:real] == newline).nonzero().reshape(-1).tolist():
        if i > 0:
            sources[i - 1], sources[i] = sources[i].clone(), sources[i - 1].clone()
    return sources


@pytest.mark.parametrize(
    "arch,how",
    [
        ("qwen2_vl", "one-text-segment"),
        ("qwen2_vl", "features-shifted"),
        ("qwen2_vl", "one-vision-segment"),
        ("qwen2_5_vl", "one-text-segment"),
        ("qwen2_5_vl", "windows-in-raster-order"),
        ("qwen3_vl", "one-text-segment"),
        ("qwen3_vl", "features-shifted"),
        ("gemma3", "one-text-segment"),
        ("gemma3", "features-shifted"),
        ("gemma3", "images-causal"),
        ("llava", "one-text-segment"),
        ("llava", "features-shifted"),
        ("llava_next", "one-text-segment"),
        ("llava_next", "features-shifted"),
        ("llava_next", "tiles-swapped"),
        ("llava_next", "newline-misplaced"),
        ("pixtral", "one-text-segment"),
        ("pixtral", "features-shifted"),
        ("pixtral", "one-vision-segment"),
        ("pixtral", "vision-positions-transposed"),
        ("mllama", "one-text-segment"),
        ("mllama", "cross-sees-another-image"),
        ("mllama", "cross-rows-unmasked"),
    ],
)
def test_a_row_with_its_layout_broken_does_not(arch, how):
    model, collator, family, encoded, tiers = _setup(arch)
    row = family.assemble(encoded, tiers.tiers[0], 0)
    ref_loss, ref_grads = _unpacked_loss_and_grads(model, collator, encoded)
    loss, grads = _row_loss_and_grads(model, family, _break(row, how))
    with pytest.raises(AssertionError):
        _assert_same(loss, grads, ref_loss, ref_grads)
    revert_optimizations(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_row_step_is_capture_safe_and_its_shapes_do_not_depend_on_the_data(arch):
    model, collator, family, encoded, tiers = _setup(arch, checkpointing=True)
    budget = tiers.tiers[0]
    rows = [family.assemble(encoded, budget, 0), family.assemble([encoded[2], encoded[0]], budget, 0)]
    assert rows[0][ROW_KEY].signature == rows[1][ROW_KEY].signature
    traces = []
    for row in rows:
        with CaptureSafety() as check:
            _row_loss_and_grads(model, family, row)
        assert any("backward" in name for name, _ in check.trace)  # the backward was seen too
        traces.append(check.trace)
    assert traces[0] == traces[1]
    # The control: the plain forward of a padded batch reads the device on the host.
    with pytest.raises(CaptureUnsafe), CaptureSafety():
        model(**collator.pad(encoded)).loss.backward()
    revert_optimizations(model)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "pixtral"])
def test_with_the_fused_kernels_a_row_still_matches_and_is_capture_safe(arch):
    """The vision rope and the fused loss (Triton's interpreter on CPU) in the row forward."""
    from visionft.kernels._utils import interpret_mode

    if not torch.cuda.is_available() and not interpret_mode():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    model, collator, family, encoded, tiers = _setup(arch, fused=True)
    row = family.assemble(encoded, tiers.tiers[0], 0)
    with CaptureSafety():
        loss, grads = _row_loss_and_grads(model, family, row)
    ref_loss, ref_grads = _unpacked_loss_and_grads(model, collator, encoded)
    _assert_same(loss, grads, ref_loss, ref_grads)
    revert_optimizations(model)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "mllama"])
def test_with_the_patch_set_a_row_matches_the_plain_model_and_is_capture_safe(arch):
    """What a run does with the optimizations on: the family's patch set (LoRA over NF4's kernel, norms,
    SwiGLU, rotary, fused loss; Triton's interpreter on CPU) and the fixed-shape rows together, against
    the unpacked samples through the plain model."""
    from visionft.kernels._utils import interpret_mode
    from visionft.patching import apply_optimizations

    if not torch.cuda.is_available() and not interpret_mode():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    model, collator, family, encoded, tiers = _setup(arch, fused=True)
    ref_loss, ref_grads = _unpacked_loss_and_grads(model, collator, encoded)
    report = apply_optimizations(model)
    for kind in ("lora", "rms_norm", "glu", "rope", "loss"):
        assert report.counts.get(kind, 0) > 0, f"{kind}: {report.summary()}"
    row = family.assemble(encoded, tiers.tiers[0], 0)
    with CaptureSafety():
        loss, grads = _row_loss_and_grads(model, family, row)
    _assert_same(loss, grads, ref_loss, ref_grads)
    revert_optimizations(model)
