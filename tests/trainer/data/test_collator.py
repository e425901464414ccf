"""VisionDataCollator on every tiny architecture: supervised tokens, image-token counts, padding of every
processor tensor, record shapes, and bad samples (error or skip, with counts and the rest of the batch
unaffected)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from visionft.data.collator import IGNORE_INDEX, VisionDataCollator, patch_multiple
from visionft.data.errors import BadSampleError
from visionft.testing.tiny import TINY_ARCHS, build_tiny_vlm, tiny_image

from .test_images import huge_png, png_bytes, truncated_jpeg

# How each template frames an assistant answer: what precedes the answer text inside the assistant turn
# and what closes the turn. Written out by hand from the real templates, independently of the collator.
FRAMING = {
    "qwen2_vl": ("", "<|im_end|>\n"),
    "qwen2_5_vl": ("", "<|im_end|>\n"),
    "qwen3_vl": ("", "<|im_end|>\n"),
    "mllama": ("", "<|eot_id|>"),
    "gemma3": ("", "<end_of_turn>\n"),
    "llava": (" ", "</s>"),
    "llava_next": (" ", "</s>"),
    "pixtral": ("", "</s>"),
}

_MODELS: dict[str, tuple] = {}


def tiny(arch):
    if arch not in _MODELS:
        _MODELS[arch] = build_tiny_vlm(arch)
    return _MODELS[arch]


def two_turns(arch):
    """Text-only first exchange, then two images and a second answer."""
    return {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi there"},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Colours?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "blue and green"}]},
        ],
        "images": [tiny_image(arch, (0, 0, 255)), tiny_image(arch, (0, 255, 0))],
    }


def one_image(arch, answer="red", image=None):
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image if image is not None else tiny_image(arch)},
                    {"type": "text", "text": "What colour?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def supervised_runs(labels, tokenizer) -> list[str]:
    """The decoded contiguous runs of supervised tokens."""
    runs, current = [], []
    for token in labels.tolist():
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def image_ids(collator):
    return torch.tensor(sorted(collator.image_token_ids))


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_exactly_the_assistant_tokens_are_supervised(arch):
    model, processor = tiny(arch)
    collator = VisionDataCollator(model, processor)
    batch = collator([two_turns(arch), one_image(arch), {"prompt": "hello", "completion": "world"}])
    before, after = FRAMING[arch]
    expected = [
        [f"{before}hi there{after}", f"{before}blue and green{after}"],
        [f"{before}red{after}"],
        [f"{before}world{after}"],
    ]
    for row, want in enumerate(expected):
        assert supervised_runs(batch["labels"][row], processor.tokenizer) == want


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_image_tokens_match_the_processor_and_the_model_accepts_the_batch(arch):
    model, processor = tiny(arch)
    samples = [
        one_image(arch),
        two_turns(arch),
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "yes"}]},
    ]
    collator = VisionDataCollator(model, processor, train_on_responses_only=False)
    batch = collator(samples)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for row, (sample, images) in enumerate(
        [
            (samples[0], [samples[0]["messages"][0]["content"][0]["image"]]),
            (samples[1], samples[1]["images"]),
            (samples[2], []),
        ]
    ):
        messages = [
            {
                "role": m["role"],
                "content": [
                    {"type": "image"} if p.get("type") == "image" else p
                    for p in (
                        m["content"]
                        if isinstance(m["content"], list)
                        else [{"type": "text", "text": m["content"]}]
                    )
                ],
            }
            for m in sample["messages"]
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        bos = processor.tokenizer.bos_token
        direct = processor(
            text=[text],
            images=images or None,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),
        )
        want = int((direct["input_ids"] == image_token).sum())
        assert int((batch["input_ids"][row] == image_token).sum()) == want
        assert want > 0 or not images
        # Padding never lands inside the sample: its tokens come first, unchanged.
        n = direct["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :n], direct["input_ids"][0])
        assert int(batch["attention_mask"][row].sum()) == n
    # Without responses-only, labels are the input ids except on image tokens and padding.
    expected = batch["input_ids"].clone()
    expected[torch.isin(expected, image_ids(collator))] = IGNORE_INDEX
    expected[batch["attention_mask"] == 0] = IGNORE_INDEX
    assert torch.equal(batch["labels"], expected)
    # The model accepts the batch: every per-arch tensor is present and consistent with the image tokens.
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama", "gemma3", "llava_next"])
def test_every_processor_tensor_is_kept(arch):
    model, processor = tiny(arch)
    sample = one_image(arch)
    image = sample["messages"][0]["content"][0]["image"]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    direct = processor(text=[text], images=[image], return_tensors="pt")
    batch = VisionDataCollator(model, processor)([sample, sample])
    assert set(direct) <= set(batch)
    assert "labels" in batch


def test_pad_to_multiple_of_and_padding_values():
    model, processor = tiny("qwen2_vl")
    collator = VisionDataCollator(model, processor, pad_to_multiple_of=64)
    batch = collator([one_image("qwen2_vl"), two_turns("qwen2_vl")])
    assert batch["input_ids"].shape[1] % 64 == 0
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["input_ids"][pad] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()


def test_images_are_fitted_to_the_pixel_budget_with_patch_alignment():
    model, processor = tiny("qwen2_vl")
    assert patch_multiple(model) == 28
    collator = VisionDataCollator(model, processor, max_image_pixels=56 * 84)
    big = Image.new("RGB", (300, 450), (200, 10, 10))
    batch = collator([one_image("qwen2_vl", image=big)])
    _, h, w = batch["image_grid_thw"][0].tolist()  # in 14-px patches
    assert (h * 14) * (w * 14) <= 56 * 84
    assert (h * 14) % 28 == 0 and (w * 14) % 28 == 0
    assert abs((w / h) - (300 / 450)) < 0.34  # aspect kept up to one patch of rounding


# ------------------------------------------------------------------------------------------------------
# Bad samples
# ------------------------------------------------------------------------------------------------------


def bad_samples(root):
    """(record, expected message fragment) for each documented rejection."""
    (root / "ok.png").write_bytes(png_bytes((56, 56)))
    return [
        (one_image("qwen2_vl", image="missing.png"), "does not exist"),
        (one_image("qwen2_vl", image=b"\x89PNG\r\n\x1a\nnot really a png"), "corrupt"),
        (one_image("qwen2_vl", image=b"plain text, no image"), "not an image PIL can read"),
        (one_image("qwen2_vl", image="ftp://example.com/a.png"), "unsupported scheme ftp://"),
        (one_image("qwen2_vl", image="file:///etc/passwd"), "unsupported scheme file://"),
        (one_image("qwen2_vl", image="https://169.254.169.254/latest/meta-data/"), "metadata"),
        (one_image("qwen2_vl", image="../ok.png"), "outside the dataset folder"),
        (one_image("qwen2_vl", image=huge_png()), "over the decode limit"),
        (one_image("qwen2_vl", image=truncated_jpeg()), "truncated or corrupt"),
    ]


def test_each_bad_sample_raises_the_documented_error(tmp_path):
    model, processor = tiny("qwen2_vl")
    root = tmp_path / "data"
    root.mkdir()
    collator = VisionDataCollator(model, processor, dataset_root=root)
    for record, fragment in bad_samples(root):
        good = one_image("qwen2_vl", image="ok.png")
        with pytest.raises(BadSampleError) as info:
            collator([good, {**record, "__index__": 41}])
        assert fragment in str(info.value)
        assert str(info.value).startswith("sample 41, field image 0: ")


def test_skip_drops_bad_samples_counts_them_and_leaves_the_rest_unchanged(tmp_path, caplog):
    model, processor = tiny("qwen2_vl")
    root = tmp_path / "data"
    root.mkdir()
    bad = [record for record, _ in bad_samples(root)]
    good = [one_image("qwen2_vl", "red", image="ok.png"), two_turns("qwen2_vl")]
    clean = VisionDataCollator(model, processor, dataset_root=root)(good)
    collator = VisionDataCollator(model, processor, dataset_root=root, on_bad_sample="skip")
    with caplog.at_level("WARNING"):
        mixed = collator([good[0], *bad, good[1]])
    assert collator.skipped == len(bad)
    assert sum("skipped sample" in r.getMessage() for r in caplog.records) == len(bad)
    assert set(mixed) == set(clean)
    for key in clean:
        assert torch.equal(mixed[key], clean[key]), key


def test_over_long_sample_errors_or_is_skipped_never_truncated():
    model, processor = tiny("qwen2_vl")
    long_answer = " ".join(["word"] * 200)
    long_sample = {**one_image("qwen2_vl", long_answer), "__index__": 5}
    strict = VisionDataCollator(model, processor, max_seq_length=128)
    with pytest.raises(BadSampleError) as info:
        strict([one_image("qwen2_vl"), long_sample])
    message = str(info.value)
    assert message.startswith("sample 5, field length: the sample is ")
    length = int(message.split("the sample is ")[1].split()[0])
    assert length > 128 and "max_seq_length=128" in message
    lenient = VisionDataCollator(model, processor, max_seq_length=128, on_bad_sample="skip")
    batch = lenient([one_image("qwen2_vl"), long_sample])
    assert lenient.skipped == 1 and batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].shape[1] <= 128


def test_all_bad_batch_raises_first_then_reuses_the_last_good_sample():
    model, processor = tiny("qwen2_vl")
    collator = VisionDataCollator(model, processor, on_bad_sample="skip")
    bad = one_image("qwen2_vl", image="gopher://x/y.png")
    with pytest.raises(BadSampleError, match="all 2 samples of the batch were bad"):
        collator([bad, bad])
    good = collator([one_image("qwen2_vl")])
    again = collator([bad])
    assert collator.substituted == 1 and collator.skipped == 3
    for key in good:
        assert torch.equal(again[key], good[key])


def test_no_assistant_turn_is_a_bad_sample_under_responses_only():
    model, processor = tiny("qwen2_vl")
    record = {"messages": [{"role": "user", "content": "only a question"}]}
    with pytest.raises(BadSampleError, match="no assistant turn"):
        VisionDataCollator(model, processor)([record])


def test_record_shapes_images_column_single_image_and_bytes():
    model, processor = tiny("qwen2_vl")
    buf = io.BytesIO()
    tiny_image("qwen2_vl").save(buf, format="PNG")
    records = [
        # images column without placeholders: images go before the first user text
        {
            "messages": [
                {"role": "user", "content": "What colour?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": [tiny_image("qwen2_vl")],
        },
        # prompt/completion with a single image column, given as bytes
        {"prompt": "What colour?", "completion": "red", "image": buf.getvalue()},
        # an OpenAI-style image_url part with a data URI is not in the hardening's way either
        one_image("qwen2_vl"),
    ]
    batch = VisionDataCollator(model, processor)(records)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = (batch["input_ids"] == image_token).sum(dim=1).tolist()
    assert counts[0] == counts[1] == counts[2] > 0
    for row in range(3):
        assert supervised_runs(batch["labels"][row], processor.tokenizer) == ["red<|im_end|>\n"]


def test_placeholder_and_image_counts_must_agree():
    model, processor = tiny("qwen2_vl")
    collator = VisionDataCollator(model, processor)
    record = two_turns("qwen2_vl")
    with pytest.raises(BadSampleError, match="no more entries"):
        collator([{**record, "images": record["images"][:1]}])


def test_a_held_out_batch_leaves_the_training_counts_and_the_stand_in_alone():
    model, processor = tiny("qwen2_vl")
    collator = VisionDataCollator(model, processor, on_bad_sample="skip")
    trained = collator([one_image("qwen2_vl", "red")])  # the training run's last good sample
    bad = one_image("qwen2_vl", image="gopher://x/y.png")
    held_out = one_image("qwen2_vl", "blue")

    batch, reasons = collator.held_out_batch([bad, held_out])
    assert len(reasons) == 1 and "unsupported scheme gopher://" in reasons[0]
    alone = VisionDataCollator(model, processor)([held_out])
    assert all(torch.equal(batch[k], alone[k]) for k in alone)
    # A batch of bad held-out samples gives nothing to score, not the training stand-in.
    none, both = collator.held_out_batch([bad, bad])
    assert none is None and [r.split(",")[0] for r in both] == ["sample 0", "sample 1"]
    assert collator.skipped == 0 and collator.substituted == 0
    # And no held-out sample becomes the stand-in of a later all-bad training batch.
    again = collator([bad])
    assert collator.substituted == 1
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_the_evaluation_loss_leaves_bad_held_out_samples_out_and_the_training_counts_alone(caplog):
    from visionft.evaluation.heldout import HeldOutSample
    from visionft.evaluation.predict import eval_loss

    model, processor = tiny("qwen2_vl")
    collator = VisionDataCollator(model, processor, on_bad_sample="skip")
    good = [one_image("qwen2_vl", answer) for answer in ("red", "a blue square")]
    bad = one_image("qwen2_vl", image="gopher://x/y.png")

    def held_out(records):
        return [HeldOutSample(index=i, record=r, prompt="", reference="") for i, r in enumerate(records)]

    expected = eval_loss(model, collator, held_out(good), batch_size=2)
    with caplog.at_level("WARNING"):
        # [good, bad] [good]: a bad sample is left out of its batch; [bad, bad] is no batch at all.
        got = eval_loss(model, collator, held_out([good[0], bad, good[1], bad, bad]), batch_size=2)
    assert got == pytest.approx(expected, rel=1e-6)
    assert collator.skipped == 0 and collator.substituted == 0
    assert sum("left out of the evaluation loss" in r.getMessage() for r in caplog.records) == 3
