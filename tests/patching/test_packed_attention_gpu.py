"""Packed rows on CUDA: the flash varlen path of ``patching.packed_attention`` against the padded SDPA
path (the one the CPU tests check against an explicit mask), forward and backward, and a packed row
through ``visionft.engine.cuda_graphs.CudaGraphTrainStep``: captured once, its replays give the eager step's
loss and gradients, also for a second row of the same signature whose samples lie elsewhere (the
segment starts are copied into the graph like the ids). Self-contained on purpose (imports nothing
from tests/); a tiny bf16 model, well under a minute.

    pytest tests/patching/test_packed_attention_gpu.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from visionft.testing.lora import tiny_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen path and CUDA graphs need CUDA"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(8, 8), (28, 4)], ids=lambda h: f"q{h[0]}kv{h[1]}")
def test_varlen_path_matches_the_padded_sdpa_path(dtype, heads):
    from visionft.patching.packed_attention import packed_attention, uses_varlen, varlen_causal_attention
    from visionft.patching.segments import pad_segments, segment_attention

    lengths, dim = [37, 300, 5, 128, 1, 64], 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    seq, scale = sum(lengths), dim**-0.5
    q = torch.randn(seq, heads[0], dim, device="cuda", generator=gen, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(seq, heads[1], dim, device="cuda", generator=gen, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    weight = torch.randn(seq, heads[0], dim, device="cuda", generator=gen, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    assert uses_varlen(q)  # what the packed text attention takes for a bf16/fp16 CUDA row

    def run(fn):
        out = fn()
        return (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))

    varlen = run(lambda: varlen_causal_attention(q, k, v, cu, max(lengths), scale))
    dispatched = run(lambda: packed_attention(q, k, v, cu, max(lengths), scale))
    layout = pad_segments(cu, len(lengths), max(lengths), seq)
    padded = run(lambda: segment_attention(q, k, v, layout, scale, causal=True))
    # fp32 reference: the padded path (exact against a block-diagonal mask in the CPU tests) in fp32.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = segment_attention(q32, k32, v32, layout, scale, causal=True)
    ref = (out32, *torch.autograd.grad((out32 * weight.float()).sum(), (q32, k32, v32)))
    for name, a, b, r, d in zip(("out", "dq", "dk", "dv"), varlen, padded, ref, dispatched, strict=True):
        # packed_attention dispatched to varlen (flash's dq accumulates atomically: not bitwise repeatable).
        assert torch.equal(a, d) if name == "out" else _rel(a, d) < 1e-3, name
        # Both 16-bit paths sit at 16-bit rounding distance from fp32, and from each other.
        assert _rel(a, r) < 1e-2 and _rel(b, r) < 1e-2, (name, _rel(a, r), _rel(b, r))
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


def _sample(answer: str, side: tuple[int, int] | None):
    content: list[dict] = [{"type": "text", "text": "What colour is it?"}]
    if side is not None:
        image = Image.new("RGB", side, (128, 128, 128))
        image.paste((220, 30, 30), (4, 4, side[0] // 2, side[1] // 2))
        content.insert(0, {"type": "image", "image": image})
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def _model(arch: str):
    from visionft.patching import apply_optimizations
    from visionft.testing.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm(arch, seed=0)
    model.to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = tiny_lora(model, torch.Generator(device="cpu").manual_seed(1))
    model.train()
    report = apply_optimizations(model)
    assert report.counts.get("static_inputs") == 1 and report.counts.get("packed_attn"), report.summary()
    return model, processor, report


def _eager(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_packed_row_replays_in_a_cuda_graph_like_the_eager_step(arch):
    from visionft.data.collator import VisionDataCollator
    from visionft.data.packing import PACKED_CU_SEQLENS
    from visionft.engine.cuda_graphs import CudaGraphTrainStep

    model, processor, report = _model(arch)
    collator = VisionDataCollator(model, processor, packing=True)
    short, long = _sample("red", (56, 56)), _sample("a red square on a grey field, small", (56, 56))
    text = _sample("only text here", None)
    rows = [collator([short, long, text]), collator([long, short, text])]
    assert rows[0]["input_ids"].shape == rows[1]["input_ids"].shape  # one signature ...
    assert rows[0][PACKED_CU_SEQLENS].tolist() != rows[1][PACKED_CU_SEQLENS].tolist()  # ... two layouts
    rows = [{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in row.items()} for row in rows]

    step = CudaGraphTrainStep(model, report, warmup=1)
    assert step.disabled is None, step.disabled
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for row in (rows[0], rows[0], rows[1]):  # eager warm-up, capture + replay, replay
        model.zero_grad(set_to_none=True)
        loss = step(row).float()
        grads = [p.grad.detach().clone() for p in params]
        eager_loss, eager_grads = _eager(model, row)
        results.append((loss, grads, eager_loss, eager_grads))
    assert step.captured == 1 and step.replays == 2 and step.eager_steps == 1

    for i, (loss, grads, eager_loss, eager_grads) in enumerate(results):
        assert torch.isfinite(loss) and abs(loss.item() - eager_loss.item()) <= 1e-2 * abs(
            eager_loss.item()
        ), (
            i,
            loss.item(),
            eager_loss.item(),
        )
        flat, flat_eager = (
            torch.cat([g.flatten() for g in grads]),
            torch.cat([g.flatten() for g in eager_grads]),
        )
        assert _rel(flat, flat_eager) < 3e-2, (i, _rel(flat, flat_eager))
    assert abs(results[1][0].item() - results[2][0].item()) > 1e-4  # the second row is not the first's replay
