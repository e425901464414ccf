"""Fixed-shape rows on CUDA (``visionft.patching.rows`` through ``visionft.engine.cuda_graphs``), on tiny 4-bit
QLoRA models of every family that has rows: a row step captured as a graph replays the eager step's loss
and gradients; over 20 steps of varied samples (image sides and answer lengths all different) graphs
replay on all but each tier's first step, with no host-device sync inside a replay step; and the loss
curve follows eager row steps of an identical model. Self-contained (imports nothing from tests/).

    pytest tests/patching/test_rows_gpu.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from visionft.testing.lora import tiny_lora
from visionft.testing.tiny import open_image_paths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA"),
]

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "llava_next", "pixtral", "mllama"]
#: The model type of a tiny architecture whose name is not one (Pixtral is a LLaVA model).
MODEL_TYPE = {"pixtral": "llava"}


def _records(arch: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        side = (rng.randint(40, 120), rng.randint(40, 120))
        image = Image.new("RGB", side, tuple(rng.randint(0, 255) for _ in range(3)))
        answer = " ".join(
            rng.choice(["red", "box", "wide", "tall", "blue"]) for _ in range(rng.randint(1, 12))
        )
        content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]
        if arch != "gemma3" and i % 7 == 3:
            content = content[1:]  # a text-only sample now and then
        out.append(
            {
                "__index__": i,
                "messages": [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
            }
        )
    return out


def _load(folder, arch):
    from transformers import AutoModelForImageTextToText
    from visionft.model.architectures import get_arch_spec
    from visionft.model.loading import quantization_config
    from visionft.patching import apply_optimizations, patch_set

    keep = [get_arch_spec(MODEL_TYPE.get(arch, arch)).vision, "lm_head"]
    quant = quantization_config(4, torch.bfloat16, keep)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    open_image_paths(model)
    torch.manual_seed(0)
    model = tiny_lora(model, torch.Generator(device="cpu").manual_seed(1))
    model.train()
    report = apply_optimizations(model)
    # LLaVA / Pixtral have no patch set (their rows take the fused loss only).
    assert report.enabled or patch_set(MODEL_TYPE.get(arch, arch)) is None, report.summary()
    return model


def _rows(arch, tmp_path, n_steps: int):
    from transformers import AutoProcessor
    from visionft.data.collator import VisionDataCollator
    from visionft.data.row_collator import RowCollator, plan_rows
    from visionft.patching.rows import enable_rows
    from visionft.testing.tiny import save_tiny_vlm

    folder = save_tiny_vlm(arch, tmp_path / arch)
    if arch in ("llava", "llava_next"):
        # LLaVA 1.5's and NeXT's layout: features of the second-to-last vision layer, so the last
        # layer's adapters get no gradient, in eager steps and replays alike.
        config = json.loads((folder / "config.json").read_text())
        config["vision_feature_layer"] = -2
        (folder / "config.json").write_text(json.dumps(config))
    processor = AutoProcessor.from_pretrained(folder)
    eager, graphed = _load(folder, arch), _load(folder, arch)
    records = _records(arch, 4 * n_steps + 64)
    collators = []
    for model in (eager, graphed):
        base = VisionDataCollator(model, processor, max_seq_length=512)
        family = enable_rows(model, base.pad_token_id)
        tiers = plan_rows(base, family, records[-64:], batch_size=4, probe=64)
        collators.append(RowCollator(base, family, tiers))
    batches = [records[4 * i : 4 * i + 4] for i in range(n_steps)]
    return eager, graphed, collators, batches


def _tensors(row):
    from visionft.engine.cuda_graphs import _ROW_HOST_ONLY
    from visionft.patching.rows import ROW_KEY

    return {
        k: v.cuda() for k, v in row.items() if isinstance(v, torch.Tensor) and k not in _ROW_HOST_ONLY
    }, row[ROW_KEY]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_row_graphs_replay_eager_numbers_on_varied_data_without_syncs(tmp_path, arch):
    _replay_rows(tmp_path, arch, offload=False)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
def test_row_graphs_with_checkpoints_held_on_the_host_replay_eager_numbers(tmp_path, arch):
    step = _replay_rows(tmp_path, arch, offload=True)
    # The captures found the warm-up's pinned buffers for every block input.
    assert step._offload.last["kept_on_device"] == 0
    assert step._offload.last["offloaded_bytes"] > 0 and step._offload.host_bytes() > 0


def _replay_rows(tmp_path, arch: str, offload: bool):
    from visionft.engine.cuda_graphs import CudaGraphTrainStep
    from visionft.engine.options import EngineOptions
    from visionft.patching import patch_report

    n_steps = 20
    eager, graphed, (col_e, col_g), batches = _rows(arch, tmp_path, n_steps)
    step = CudaGraphTrainStep(
        graphed,
        patch_report(graphed),
        warmup=1,
        rows=col_g.family,
        options=EngineOptions(offload_checkpoints=offload),
    )
    assert step.disabled is None, step.disabled
    if offload:
        step._offload.min_bytes = 0  # tiny models: every block input goes to the host
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_g = [p for p in graphed.parameters() if p.requires_grad]
    opt_e = torch.optim.AdamW(params_e, lr=5e-3)
    opt_g = torch.optim.AdamW(params_g, lr=5e-3)
    losses_e, losses_g, shapes = [], [], set()
    checked = False
    for records in batches:
        row_e, row_g = col_e(records), col_g(records)
        tensors, info = _tensors(row_e)
        shapes.add(tuple(tensors["input_ids"].shape))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_e = col_e.family.forward(eager, tensors, info)
        loss_e.backward()
        if step.replays and not checked:
            # Replay against eager on the same weights: the graphed model's own eager step.
            before = [p.detach().clone() for p in params_g]
            loss_r = step(row_g)
            grads_r = [None if p.grad is None else p.grad.detach().clone() for p in params_g]
            opt_g.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_x = col_g.family.forward(graphed, *_tensors(row_g))
            loss_x.backward()
            assert all(torch.equal(a, p) for a, p in zip(before, params_g, strict=True))
            assert _rel(loss_r, loss_x.detach()) < 1e-3
            assert [r is None for r in grads_r] == [p.grad is None for p in params_g]
            worst = max(_rel(r, p.grad) for r, p in zip(grads_r, params_g, strict=True) if p.grad is not None)
            assert worst < 2e-2, worst
            opt_g.zero_grad(set_to_none=True)
            checked = True
        if step.replays:
            torch.cuda.set_sync_debug_mode("error")  # a replay step must not wait for the device
        try:
            loss_g = step(row_g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        losses_e.append(loss_e.item())
        losses_g.append(loss_g.item())
    signatures = len(step._signatures)  # one per row tier used
    assert signatures <= 2 and step.eager_steps == signatures  # each tier's first step only
    assert step.captured == sum(s.graph is not None for s in step._signatures.values())
    assert step.replays == n_steps - signatures + int(checked)
    assert step.replay_share >= (n_steps - 2) / n_steps
    assert len(shapes) <= 2  # 20 batches of different samples, at most two shapes
    assert losses_g == pytest.approx(losses_e, rel=5e-2), (losses_e, losses_g)
    assert losses_g[-1] < losses_g[0], losses_g
    return step
