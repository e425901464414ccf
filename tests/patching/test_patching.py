"""The patch layer on tiny models of every family with a patch set: same loss and gradients as the plain
model, the same loss curve over a few steps, an exact revert, the one switch, single kinds switched off,
and the fallback line."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from visionft.engine.options import EngineOptions
from visionft.patching import apply_optimizations, revert_optimizations
from visionft.testing.lora import tiny_lora
from visionft.testing.tiny import build_tiny_vlm, tiny_image

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch(arch: str, processor, n_images: int = 1):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square on grey."}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    batch = processor(text=[text], images=[tiny_image(arch)], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = -100  # supervise only the second half, as a chat mask would
    batch["labels"] = labels
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _model(arch: str, lora: bool):
    model, processor = build_tiny_vlm(arch, seed=0)
    model.to(DEVICE).train()
    if lora:
        model = tiny_lora(model)
    return model, processor


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_patched_matches_plain_loss_and_grads(arch, lora):
    model, processor = _model(arch, lora)
    batch = _batch(arch, processor)
    loss_plain, grads_plain = _loss_and_grads(model, batch)

    report = apply_optimizations(model, optimizations=True)
    assert report.enabled, report.summary()
    assert report.counts.get("rms_norm", 0) > 0 and report.counts.get("glu", 0) > 0
    assert report.counts.get("rope") == 1 and report.counts.get("loss") == 1
    if lora:
        assert report.counts.get("lora", 0) > 0
    loss_fast, grads_fast = _loss_and_grads(model, batch)
    revert_optimizations(model)

    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        err = (grads_fast[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_loss_curve_agrees_over_steps():
    arch = "qwen2_5_vl"
    base, processor = _model(arch, lora=True)
    batch = _batch(arch, processor)
    curves = []
    for optimized in (False, True):
        model = copy.deepcopy(base)
        apply_optimizations(model, optimizations=optimized)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        revert_optimizations(model)
        curves.append(losses)
    plain, fast = curves
    assert plain[-1] < plain[0]  # it learns
    for a, b in zip(plain, fast, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (plain, fast)


def test_revert_restores_plain_modules_and_functions():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    model, _ = _model("qwen2_5_vl", lora=True)
    rope_before = {
        k: getattr(m, k) for k in ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb") if hasattr(m, k)
    }
    instance_forwards = sum("forward" in vars(mod) for mod in model.modules())
    apply_optimizations(model)
    assert sum("forward" in vars(mod) for mod in model.modules()) > instance_forwards
    assert revert_optimizations(model)
    assert sum("forward" in vars(mod) for mod in model.modules()) == instance_forwards
    assert "_loss_function" not in vars(model.get_base_model())
    for k, fn in rope_before.items():
        assert getattr(m, k) is fn
    assert not revert_optimizations(model)  # nothing left to undo


def test_one_switch_turns_everything_off(monkeypatch, caplog):
    model, _ = _model("qwen2_5_vl", lora=False)
    monkeypatch.setenv("VISIONFT_DISABLE_KERNELS", "1")
    with caplog.at_level(logging.INFO, logger="visionft.patching"):
        report = apply_optimizations(model, optimizations=EngineOptions.resolve().optimizations)
    assert not report.enabled and not report.counts
    assert "switched off" in caplog.text
    assert "forward" not in vars(model.model.language_model.norm)
    # and the explicit argument wins over the environment
    assert apply_optimizations(
        model, optimizations=EngineOptions.resolve(optimizations=True).optimizations
    ).enabled
    revert_optimizations(model)


def test_uncovered_architecture_falls_back_with_one_log_line(caplog, monkeypatch):
    import dataclasses

    from visionft.model import architectures

    # An architecture whose family names no patch set (as one registered without kernels would).
    plain = dataclasses.replace(architectures.get_arch_spec("llava"), patches=None, modeling={})
    monkeypatch.setitem(architectures._BY_TYPE, "llava", plain)
    model, _ = build_tiny_vlm("llava", seed=0)
    with caplog.at_level(logging.INFO, logger="visionft.patching"):
        report = apply_optimizations(model)
    assert not report.enabled
    lines = [r for r in caplog.records if r.name == "visionft.patching"]
    assert len(lines) == 1 and "no patch set for model_type='llava'" in lines[0].getMessage()


def test_a_switch_that_names_no_kind_is_refused():
    model, _ = _model("qwen2_vl", lora=False)
    with pytest.raises(ValueError, match=r"no kind of swap is called rpoe; the kinds are rope, "):
        apply_optimizations(model, rpoe=False)
    revert_optimizations(model)


def test_a_switched_off_kind_is_left_plain():
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb
    model, _ = _model("llava", lora=True)
    report = apply_optimizations(model, rope=False, lora=False)
    assert "rope" not in report.counts and "lora" not in report.counts, report.summary()
    assert report.counts.get("rms_norm", 0) > 0, report.summary()
    assert modeling_llama.apply_rotary_pos_emb is rope
    revert_optimizations(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "pixtral", "mllama"])
def test_patched_matches_plain_on_a_4bit_qlora_model(tmp_path, arch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visionft.model.architectures import get_arch_spec
    from visionft.model.loading import quantization_config
    from visionft.testing.tiny import save_tiny_vlm

    folder = save_tiny_vlm(arch, tmp_path / "tiny")
    # The text side in NF4; the tiny vision towers (32 wide) stay in 16 bit, where bf16 rounding alone
    # already moves their gradients by percents.
    spec = get_arch_spec("llava" if arch == "pixtral" else arch)
    quant = quantization_config(4, torch.bfloat16, [spec.vision, *spec.projector, "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    processor = AutoProcessor.from_pretrained(folder)
    model = tiny_lora(model)
    model.train()
    # Pixels in the model's dtype: not every family casts them itself.
    batch = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _batch(arch, processor).items()
    }
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    report = apply_optimizations(model)
    assert report.counts.get("lora", 0) > 0, report.summary()
    loss_fast, grads_fast = _loss_and_grads(model, batch)
    revert_optimizations(model)
    # PEFT runs the adapters in fp32, the fused path in bf16 (and this tiny model's 32-wide vision
    # tower in bf16 amplifies rounding): compare at bf16 accuracy. The fp32 tests above check exactness.
    assert abs(loss_fast.item() - loss_plain.item()) <= 1e-2 * abs(loss_plain.item())
    flat_fast = torch.cat([grads_fast[n].float().flatten() for n in grads_plain])
    flat_plain = torch.cat([g.float().flatten() for g in grads_plain.values()])
    assert ((flat_fast - flat_plain).norm() / flat_plain.norm()).item() < 6e-2
    for name, g in grads_plain.items():
        err = ((grads_fast[name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12)).item()
        # Per tensor, deep vision lora_A gradients are the noisiest (0.151 seen once on an H200).
        assert err < 0.25, f"{name}: relative gradient error {err:.2e}"


#: What each family's patch set must swap on its tiny model (Pixtral's tower has RMSNorms, no LayerNorm;
#: its tiny MLP is gated GELU, left plain; CLIP's and Mllama's vision MLPs are not gated).
PATCH_SET_KINDS = {
    "gemma3": {"rope", "rms_norm", "layer_norm", "glu", "loss"},
    "qwen3_vl": {"rope", "rms_norm", "layer_norm", "glu", "loss"},
    "llava": {"rope", "rms_norm", "layer_norm", "glu", "loss"},
    "pixtral": {"rope", "rms_norm", "glu", "loss"},
    "llava_next": {"rope", "rms_norm", "layer_norm", "glu", "loss"},
    "mllama": {"rope", "rms_norm", "layer_norm", "glu", "loss"},
}


@pytest.mark.parametrize(
    "arch, lora",
    [("gemma3", False), ("gemma3", True), ("qwen3_vl", False), ("qwen3_vl", True)]
    + [(arch, True) for arch in ("llava", "pixtral", "llava_next", "mllama")],
)
def test_patch_sets_match_plain(arch, lora):
    model, processor = _model(arch, lora)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square on grey."}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    batch = processor(text=[text], images=[tiny_image(arch)], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    report = apply_optimizations(model, optimizations=True)
    for kind in PATCH_SET_KINDS[arch] | ({"lora"} if lora else set()):
        assert report.counts.get(kind, 0) > 0, f"{kind}: {report.summary()}"
    assert report.counts["rope"] == 1 and report.counts["loss"] == 1
    loss_fast, grads_fast = _loss_and_grads(model, batch)
    revert_optimizations(model)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        err = (grads_fast[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_patched_model_still_generates():
    # generate() checks its inputs against the forward's signature, which the fused-loss wrapper keeps.
    model, processor = _model("qwen2_vl", lora=True)
    batch = {k: v for k, v in _batch("qwen2_vl", processor).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=3, do_sample=False)
    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("loss") == 1, report.summary()
    with torch.no_grad():
        patched = model.generate(**batch, max_new_tokens=3, do_sample=False)
    revert_optimizations(model)
    assert torch.equal(patched, plain)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_vl"])
def test_vision_layer_norms_stay_in_the_autocast_dtype(arch):
    # CUDA autocast runs layer_norm in fp32 and returns fp32, which each reading linear casts again; the
    # swap returns bf16 with the fp32 result's values (the next linear would round them to bf16 anyway).
    model, _ = _model(arch, lora=True)
    norm = next(m for m in model.modules() if type(m) is torch.nn.LayerNorm)
    x = torch.randn(5, norm.normalized_shape[0], dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    ref = torch.nn.functional.layer_norm(
        x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
    )
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        plain = norm(x)
    if DEVICE.type == "cuda":
        assert plain.dtype == torch.float32
    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("layer_norm", 0) > 0, report.summary()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fast = norm(x)
    (g_fast,) = torch.autograd.grad(fast.float().pow(2).sum(), x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, ref.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=2e-2, atol=5e-2)
    # Outside autocast, and on an fp32 input, the module's own forward runs.
    assert norm(x.float()).dtype == torch.float32
    revert_optimizations(model)
    assert "forward" not in vars(norm)


def _zero_adapter_and_disabled_logits(model, processor, dtype, monkeypatch):
    """Logits of ``model`` with LoRA B = 0, and with its adapters disabled, both under no grad; also how
    many layers took the kernel's base-only path."""
    import visionft.patching.modules as modules

    calls, original = [], modules.base_linear

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(modules, "base_linear", counting)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.zero_()
    batch = {k: v for k, v in _batch("qwen2_5_vl", processor).items() if k != "labels"}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("lora", 0) > 0, report.summary()
    with torch.no_grad():
        policy = model(**batch).logits
        with model.disable_adapter():
            reference = model(**batch).logits
    revert_optimizations(model)
    return policy, reference, len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_disabled_give_the_zero_adapter_output_bit_for_bit(dtype, monkeypatch):
    # DPO's reference pass runs the policy model with its adapters disabled; before the first update
    # (LoRA B = 0) it must equal the policy exactly, or the first implicit reward margin is noise
    # (on NF4 bases bitsandbytes' own matmul differs from the kernel's: the GPU test below).
    model, processor = _model("qwen2_5_vl", lora=True)
    model.to(dtype)
    policy, reference, base_calls = _zero_adapter_and_disabled_logits(model, processor, dtype, monkeypatch)
    assert base_calls > 0
    assert torch.equal(policy, reference), (policy - reference).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
def test_adapters_disabled_on_a_4bit_model_give_the_zero_adapter_output_bit_for_bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visionft.model.loading import quantization_config
    from visionft.testing.tiny import save_tiny_vlm

    folder = save_tiny_vlm("qwen2_5_vl", tmp_path / "tiny")
    quant = quantization_config(4, torch.bfloat16, ["model.visual", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    model = tiny_lora(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        policy, reference, base_calls = _zero_adapter_and_disabled_logits(
            model, AutoProcessor.from_pretrained(folder), torch.bfloat16, monkeypatch
        )
    assert base_calls > 0
    assert torch.equal(policy, reference), (policy - reference).abs().max()


def test_a_no_grad_forward_with_labels_keeps_the_models_loss():
    # Evaluation scores held-out samples with labels under no grad: the plain head runs, so the loss
    # must be the model's own on real logits, not the fused one (which takes hidden states).
    model, processor = _model("qwen2_vl", lora=True)
    batch = _batch("qwen2_vl", processor)
    with torch.no_grad():
        plain = model(**batch).loss
    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("loss") == 1, report.summary()
    with torch.no_grad():
        patched = model(**batch)
    revert_optimizations(model)
    assert patched.logits is not None
    torch.testing.assert_close(patched.loss, plain, rtol=1e-5, atol=1e-6)
