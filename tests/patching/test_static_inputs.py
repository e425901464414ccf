"""The sync-free forward that CUDA graphs replay (``patching.static_inputs``), on tiny Qwen2-VL and
Qwen2.5-VL models: the same loss and gradients as the plain forward, the hooks inert without a plan,
uncovered batches named, and ``CudaGraphTrainStep``'s eager fallback training like plain steps.
The capture itself needs CUDA: tests/trainer/engine/test_cuda_graphs_gpu.py (gpu marker) and
bench/qlora_step.py."""

from __future__ import annotations

import logging

import pytest
import torch
from visionft.engine.cuda_graphs import CudaGraphTrainStep, model_reason
from visionft.patching import apply_optimizations, revert_optimizations
from visionft.patching import static_inputs as si

from tests.patching.test_patching import DEVICE, _batch, _loss_and_grads, _model


def _lora_model(arch: str):
    return _model(arch, lora=True)


def _plan_loss_and_grads(model, plan):
    model.zero_grad(set_to_none=True)
    with si.active(plan):
        out = model(**plan.model_kwargs())
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_prepared_inputs_give_the_plain_loss_and_gradients(arch):
    model, processor = _lora_model(arch)
    batch = _batch(arch, processor)
    loss_plain, grads_plain = _loss_and_grads(model, batch)

    report = apply_optimizations(model, optimizations=True)
    assert report.counts.get("static_inputs") == 1, report.summary()
    hf = model.get_base_model()
    cache: dict = {}
    plan = si.prepare(hf, batch, cache=cache)
    # The vision tensors are computed once per signature and reused.
    assert si.prepare(hf, batch, cache=cache).vision is plan.vision
    assert plan.fixed["attention_mask"] is None and plan.fixed["image_grid_thw"].device.type == "cpu"
    if arch == "qwen2_5_vl":
        assert {"window_index", "cu_window_seqlens"} <= set(plan.vision)
    loss_plan, grads_plan = _plan_loss_and_grads(model, plan)
    # The hooks are inert outside ``active``: the plain batch still works through them.
    loss_again, _ = _loss_and_grads(model, batch)
    revert_optimizations(model)

    torch.testing.assert_close(loss_plan, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_again, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_plan.keys() == grads_plain.keys() and grads_plain
    for name, g in grads_plain.items():
        err = (grads_plan[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_uncovered_batches_are_named():
    model, processor = _lora_model("qwen2_5_vl")
    apply_optimizations(model, optimizations=True)
    hf = model.get_base_model()
    batch = _batch("qwen2_5_vl", processor)

    padded = dict(batch, attention_mask=batch["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        si.prepare(hf, padded)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        si.prepare(hf, dict(batch, pixel_values_videos=batch["pixel_values"]))
    text_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    with pytest.raises(ValueError, match="no image"):
        si.prepare(hf, text_only)

    broken = dict(batch, input_ids=batch["input_ids"].clone())
    image_token = hf.config.image_token_id
    first = (broken["input_ids"][0] == image_token).nonzero()[0, 0]
    broken["input_ids"][0, first] = 0  # one placeholder fewer than the image's features
    with pytest.raises(ValueError, match="do not match"):
        si.prepare(hf, broken)
    revert_optimizations(model)


def test_graph_step_falls_back_to_eager_on_cpu_and_trains_like_plain_steps(caplog):
    torch.manual_seed(0)
    model_a, processor = _lora_model("qwen2_vl")
    model_b, _ = _lora_model("qwen2_vl")
    model_b.load_state_dict(model_a.state_dict())
    batch = _batch("qwen2_vl", processor)
    report = apply_optimizations(model_b, optimizations=True)

    if DEVICE.type == "cpu":
        assert "CUDA" in (model_reason(model_b, report) or "")
    with caplog.at_level(logging.INFO, logger="visionft.engine.cuda_graphs"):
        step = CudaGraphTrainStep(model_b, report, autocast_dtype=None)
    if DEVICE.type == "cpu":
        assert step.disabled and "CUDA graphs off" in caplog.text

    def sgd(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.2 * p.grad
        model.zero_grad(set_to_none=True)

    losses_a, losses_b = [], []
    for _ in range(8):
        loss_a = model_a(**batch).loss
        loss_a.backward()
        losses_a.append(loss_a.item())
        sgd(model_a)
        losses_b.append(step(batch).item())
        sgd(model_b)
    revert_optimizations(model_b)
    if DEVICE.type == "cpu":
        assert step.eager_steps == 8 and step.replays == 0
    assert losses_b == pytest.approx(losses_a, rel=2e-3)  # patched kernels vs plain, fp32
    assert losses_b[-1] < 0.5 * losses_b[0], losses_b  # it really learns the one batch
