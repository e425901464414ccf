"""CUDA-graph replay of the training step (``visionft.engine.cuda_graphs``) on a tiny 4-bit QLoRA model: the
same loss curve as eager steps of an identical model, with two batch signatures alternating (two
graphs sharing one memory pool), and the model really learning. Needs CUDA and bitsandbytes; the
sync-free inputs the graph relies on are checked on CPU in test_static_inputs.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from visionft.testing.lora import tiny_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA"),
]


def _batch(processor, side: tuple[int, int], answer: str):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    image = Image.new("RGB", side, (200, 30, 30))
    batch = processor(text=[text], images=[image], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = -100
    batch["labels"] = labels
    return {k: v.to("cuda") for k, v in batch.items()}


def _load(folder):
    from transformers import AutoModelForImageTextToText
    from visionft.model.loading import quantization_config
    from visionft.patching import apply_optimizations

    quant = quantization_config(4, torch.bfloat16, ["model.visual", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = tiny_lora(model, torch.Generator(device="cpu").manual_seed(1))
    model.train()
    report = apply_optimizations(model)
    assert report.counts.get("static_inputs") == 1, report.summary()
    return model, report


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_graph_replay_trains_like_eager_steps(tmp_path, arch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoProcessor
    from visionft.engine.cuda_graphs import CudaGraphTrainStep
    from visionft.testing.tiny import save_tiny_vlm

    folder = save_tiny_vlm(arch, tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(folder)
    batches = [_batch(processor, (56, 56), "A red square."), _batch(processor, (84, 56), "A wide red box.")]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape  # two signatures

    (eager, _), (graphed, report) = _load(folder), _load(folder)
    step = CudaGraphTrainStep(graphed, report, warmup=2)
    assert step.disabled is None, step.disabled
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_g = [p for p in graphed.parameters() if p.requires_grad]
    opt_e = torch.optim.AdamW(params_e, lr=5e-3)
    opt_g = torch.optim.AdamW(params_g, lr=5e-3)

    losses_e, losses_g = [], []
    for i in range(16):
        batch = batches[i % 2]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_e = eager(**batch).loss
        loss_e.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        loss_g = step(batch)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        losses_e.append(loss_e.item())
        losses_g.append(loss_g.item())

    assert step.captured == 2 and step.replays == 12 and step.eager_steps == 4
    assert losses_g == pytest.approx(losses_e, rel=3e-2), (losses_e, losses_g)
    assert losses_g[-1] < 0.6 * losses_g[0], losses_g


@pytest.mark.parametrize("hf_style", [False, True], ids=["AdamW8bit", "AdamW-optim_bits-8"])
def test_sync_free_adamw_8bit_matches_bitsandbytes(hf_style):
    bnb = pytest.importorskip("bitsandbytes")
    from visionft.engine.optim import adamw_8bit, remove_per_parameter_sync

    def make(params):
        if not hf_style:
            return adamw_8bit(params, lr=1e-2, weight_decay=0.01)
        # What the HF Trainer builds for optim="adamw_bnb_8bit".
        opt = bnb.optim.AdamW(params, lr=1e-2, weight_decay=0.01, optim_bits=8)
        assert remove_per_parameter_sync(opt)
        return opt

    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(16, 4096), (4096, 16), (300,), (64, 64)]  # 8-bit and (small) 32-bit states
    params_a = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    if hf_style:
        opt_a = bnb.optim.AdamW(params_a, lr=1e-2, weight_decay=0.01, optim_bits=8)
    else:
        opt_a = bnb.optim.AdamW8bit(params_a, lr=1e-2, weight_decay=0.01)
    opt_b = make(params_b)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
        for pa, pb, g in zip(params_a, params_b, grads, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa, pb)
    assert opt_b.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()
