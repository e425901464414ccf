"""Packed rows on tiny Qwen2-VL / Qwen2.5-VL models (``patching.packed_attention``, ``data.packing``):
the segmented attention against an explicit block-diagonal causal mask, the M-RoPE positions of a
packed row, a packed row's loss and LoRA gradients against the same samples in a padded batch (plain
and with every kernel plus checkpointing), the static inputs CUDA graphs use, and the switch.
The varlen (CUDA) path and graph replay: test_packed_attention_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from visionft.data.collator import VisionDataCollator
from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN
from visionft.patching import apply_optimizations, enable_packing, patch_report, revert_optimizations
from visionft.patching import static_inputs as si
from visionft.patching.packed_attention import installed, packed_attention
from visionft.testing.tiny import build_tiny_vlm

from tests.patching.test_patching import DEVICE, _loss_and_grads, _model

# --------------------------------------------------------------------------------------------------
# The attention itself
# --------------------------------------------------------------------------------------------------


def _reference(q, k, v, lengths, scale):
    """SDPA over the whole sequence with an explicit (S x S) block-diagonal causal mask."""
    seq = q.shape[0]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(seq)
    mask = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("lengths", [[7, 19, 1, 12], [16, 16, 16], [40], [1, 1, 3]], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_packed_attention_matches_a_block_diagonal_causal_mask(lengths, heads, dtype):
    gen = torch.Generator().manual_seed(0)
    seq, dim, scale = sum(lengths), 8, 8**-0.5
    q = torch.randn(seq, heads[0], dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(seq, heads[1], dim, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = packed_attention(q, k, v, cu, max(lengths), scale)
    weight = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    # The reference in fp64 from the same inputs: bf16 is compared at its own precision.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(q64, k64, v64, lengths, scale)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), (q64, k64, v64))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


class _Fp32Reads(TorchDispatchMode):
    """Records the ops that read an fp32 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in leaves):
            self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["text", "vision"])
def test_under_autocast_fp32_operands_attend_in_the_autocast_dtype(which):
    """bitsandbytes' 4-bit linear hands back its input's dtype, fp32 after an autocast LayerNorm: the
    attention still runs in the autocast dtype from its first op on (on CUDA: the flash varlen path),
    as transformers' SDPA attention does under autocast."""
    from visionft.patching.rows.base import segments_attention

    gen = torch.Generator().manual_seed(0)
    lengths, dim = [5, 9, 2], 8
    q, k, v = (torch.randn(sum(lengths), 2, dim, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Fp32Reads() as reads:
        if which == "text":
            out = packed_attention(q, k, v, cu, max(lengths), dim**-0.5)
        else:
            out = segments_attention(q, k, v, cu, max(lengths), dim**-0.5, causal=False)
    assert out.dtype == torch.bfloat16
    assert reads.ops == {"_to_copy"}  # the casts, nothing else: no layout gather or kernel in fp32


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


def _image(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste(color, (4, 4, size[0] // 2, size[1] // 2))
    return image


def _sample(answer: str, image: Image.Image | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": "What colour is it?"}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def _on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def _samples() -> list[dict]:
    """Three images of different sizes (2x2, 4x2 and 3x4 merged tokens) and one text-only sample."""
    return [
        _sample("red", _image((56, 56), (220, 30, 30))),
        _sample("a wide green one", _image((112, 56), (30, 220, 30))),
        _sample("no image, just text"),
        _sample("blue and tall", _image((84, 112), (30, 30, 220))),
    ]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_rope_positions_of_a_packed_row_are_each_samples_own_plus_one_offset(arch):
    model, processor = build_tiny_vlm(arch)
    enable_packing(model)
    collator = VisionDataCollator(model, processor, packing=True)
    samples = _samples()
    packed = collator(samples)
    row = model.model.compute_3d_position_ids(
        input_ids=packed["input_ids"],
        inputs_embeds=None,
        image_grid_thw=packed["image_grid_thw"],
        video_grid_thw=None,
        attention_mask=packed["attention_mask"],
        past_key_values=None,
        mm_token_type_ids=packed["mm_token_type_ids"],
    )
    cu = packed[PACKED_CU_SEQLENS].tolist()
    for i, sample in enumerate(samples):
        alone = collator.encode(sample)
        own = model.model.compute_3d_position_ids(
            input_ids=alone["input_ids"],
            inputs_embeds=None,
            image_grid_thw=alone.get("image_grid_thw"),
            video_grid_thw=None,
            attention_mask=None,
            past_key_values=None,
            mm_token_type_ids=alone["mm_token_type_ids"],
        )
        if own is None:  # text only: the text model counts 0, 1, 2, ... on all three axes
            own = torch.arange(alone["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
        offset = row[:, :, cu[i] : cu[i + 1]] - own
        assert (offset == offset.flatten()[0]).all(), f"sample {i}: offsets differ across tokens or axes"
        # The offset is where the previous sample's positions stopped (its last token is text).
        expected = 0 if i == 0 else int(row[0, 0, cu[i] - 1]) + 1
        assert int(offset.flatten()[0]) == expected


# --------------------------------------------------------------------------------------------------
# A packed row against a padded batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,optimized",
    [("qwen2_5_vl", False), ("qwen2_vl", False), ("qwen2_5_vl", True)],
    ids=["qwen2_5_vl-plain", "qwen2_vl-plain", "qwen2_5_vl-kernels-checkpointing"],
)
def test_packed_row_gives_the_padded_batchs_loss_and_lora_gradients(arch, optimized):
    model, processor = _model(arch, lora=True)
    if optimized:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        report = apply_optimizations(model, optimizations=True)
        assert report.counts.get("packed_attn") == 2 and report.counts.get("rope") == 1, report.summary()
    enable_packing(model)  # what a run does once the kernels are in (their own packed attention, if any)
    padded = _on_device(VisionDataCollator(model, processor)(_samples()))
    packed = _on_device(VisionDataCollator(model, processor, packing=True)(_samples()))
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert installed(model.get_base_model())

    loss_padded, grads_padded = _loss_and_grads(model, padded)
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    # Both are the mean over the batch's supervised tokens (sum / total), the HF loss's reduction.
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert grads_packed.keys() == grads_padded.keys() and all("lora_" in n for n in grads_padded)
    for name, g in grads_padded.items():
        err = (grads_packed[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"

    # The same row without the packed attention lets samples see each other: the test can tell.
    revert_optimizations(model)
    assert not installed(model.get_base_model())
    with torch.no_grad():
        leaky = model(**packed).loss
    assert abs(leaky.item() - loss_padded.item()) > 1e-3


def test_static_inputs_take_a_packed_row_and_give_its_eager_loss():
    model, processor = _model("qwen2_vl", lora=True)
    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("static_inputs") == 1, report.summary()
    hf = model.get_base_model()
    packed = _on_device(VisionDataCollator(model, processor, packing=True)(_samples()))
    loss_eager, grads_eager = _loss_and_grads(model, packed)

    plan = si.prepare(hf, packed)
    assert plan.dynamic[PACKED_CU_SEQLENS].dtype == torch.int32
    assert plan.fixed[PACKED_MAX_SEQLEN] == packed[PACKED_MAX_SEQLEN]
    assert plan.signature[-3:] == ("packed", 4, packed[PACKED_MAX_SEQLEN])
    model.zero_grad(set_to_none=True)
    with si.active(plan):
        loss_plan = model(**plan.model_kwargs()).loss
    loss_plan.backward()
    revert_optimizations(model)
    torch.testing.assert_close(loss_plan.detach(), loss_eager, rtol=1e-5, atol=1e-6)
    for name, g in grads_eager.items():
        err = (dict(model.named_parameters())[name].grad - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


# --------------------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------------------


def test_enable_packing_alone_is_idempotent_inert_without_the_key_and_reverts():
    model, processor = _model("qwen2_vl", lora=True)
    batch = _on_device(VisionDataCollator(model, processor)(_samples()[:2]))
    loss_plain, _ = _loss_and_grads(model, batch)
    report = enable_packing(model)  # optimizations off: the packed attention alone
    assert report.counts == {"packed_attn": 2} and patch_report(model) is None
    assert enable_packing(model) is report and report.counts == {"packed_attn": 2}
    loss_patched, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_patched, loss_plain, rtol=0, atol=0)
    # apply_optimizations on top installs its own; reverting undoes both.
    assert apply_optimizations(model, optimizations=True).counts.get("packed_attn") == 2
    assert enable_packing(model) is patch_report(model)
    assert revert_optimizations(model)
    assert not installed(model.get_base_model())
    assert all("forward" not in vars(m) for m in model.get_base_model().model.language_model.modules())


def test_packing_is_refused_for_other_architectures():
    model, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"qwen2_vl and qwen2_5_vl only.*model_type='llava'"):
        enable_packing(model)
    gemma, _ = build_tiny_vlm("gemma3")
    with pytest.raises(ValueError, match=r"model_type='gemma3' \(its family trains on fixed-shape rows"):
        enable_packing(gemma)
    with pytest.raises(ValueError, match=r"training\.packing.*llava model.*set packing to false"):
        VisionDataCollator(model, processor, packing=True)
    qwen, qwen_processor = build_tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        VisionDataCollator(qwen, qwen_processor, packing=True, pad_to_multiple_of=8)
