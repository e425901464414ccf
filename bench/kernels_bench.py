"""Times each fused kernel (forward + backward) against its PyTorch reference, and Liger-Kernel where
it has the same op, at Qwen2.5-VL-7B shapes (1024 tokens, bf16) on one GPU.

    python bench/kernels_bench.py [--json OUT.json]

Prints one row per op: median milliseconds (``triton.testing.do_bench``) and CUDA kernels launched
per call (counted with the profiler). Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton


def _count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _fwd_bwd(make):
    def run():
        inputs, out_fn = make()
        out = out_fn(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def cases():
    from visionft.kernels import fused_linear_ce, glu, lora_nf4, nf4, rms_norm, rope

    dev, bf = "cuda", torch.bfloat16
    t, h, inter, vocab = 1024, 3584, 18944, 152064
    x = torch.randn(t, h, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(h, device=dev, dtype=bf, requires_grad=True)
    yield (
        "rms_norm 1024x3584",
        (lambda: rms_norm.rms_norm(x, w, 1e-6), lambda: rms_norm.rms_norm_reference(x, w, 1e-6)),
    )

    q = torch.randn(1, 1024, 28, 128, device=dev, dtype=bf).transpose(1, 2).requires_grad_(True)
    k = torch.randn(1, 1024, 4, 128, device=dev, dtype=bf).transpose(1, 2).requires_grad_(True)
    pos = torch.randint(0, 1024, (3, 1, 1024), device=dev).float()
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    sec = [16, 24, 24]
    yield (
        "mrope q28/k4 x1024x128",
        (
            lambda: rope.apply_mrope(q, k, cos, sin, sec),
            lambda: rope.apply_mrope_reference(q, k, cos, sin, sec),
        ),
    )

    g = torch.randn(t, inter, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(t, inter, device=dev, dtype=bf, requires_grad=True)
    yield "swiglu 1024x18944", (lambda: glu.swiglu(g, u), lambda: glu.swiglu_reference(g, u))
    yield "geglu 1024x18944", (lambda: glu.geglu(g, u), lambda: glu.geglu_reference(g, u))

    hw = torch.randn(vocab, h, device=dev, dtype=bf) * 0.02
    labels = torch.randint(0, vocab, (t,), device=dev)
    labels[:768] = -100
    yield (
        "lm_head+CE 1024x3584->152064",
        (
            lambda: fused_linear_ce.fused_linear_cross_entropy(x, hw, labels),
            lambda: fused_linear_ce.fused_linear_cross_entropy_reference(x, hw, labels),
        ),
    )

    wq = torch.randn(inter, h, device=dev, dtype=bf) * 0.02
    packed, state = None, None
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(wq, blocksize=64, compress_statistics=True, quant_type="nf4")
        yield (
            "nf4 dequant 18944x3584 (vs bnb)",
            (
                lambda: nf4.dequantize_nf4(packed, state),
                lambda: bnbf.dequantize_4bit(packed, state, quant_type="nf4"),
            ),
        )
    except ImportError:
        packed, state = nf4.quantize_nf4_reference(wq)
    a = (torch.randn(16, h, device=dev) * 0.01).requires_grad_(True)
    b = (torch.randn(inter, 16, device=dev) * 0.01).requires_grad_(True)
    yield (
        "lora nf4 1024x3584->18944 r16",
        (
            lambda: lora_nf4.lora_nf4_linear(x, packed, state, None, a, b, 2.0),
            lambda: _peft_like(x, packed, state, a, b, 2.0),
        ),
    )


def _peft_like(x, packed, state, a, b, scale):
    """What PEFT + bitsandbytes do: dequant-matmul, then an fp32 LoRA branch, cast and add."""
    import bitsandbytes as bnb

    out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    lora = (x.float() @ a.t()) @ b.t() * scale
    return out + lora.to(out.dtype)


def liger_cases():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
        from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
    except Exception:
        return {}
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(1024, 3584, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(3584, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(1024, 18944, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(1024, 18944, device=dev, dtype=bf, requires_grad=True)
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu

    return {
        "rms_norm 1024x3584": lambda: liger_rms_norm(x, w, 1e-6),
        "swiglu 1024x18944": lambda: liger_swiglu(g, u),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    liger = liger_cases()
    for name, (fast, ref) in cases():
        row = {"op": name}
        for label, fn in (("ours", fast), ("torch", ref), ("liger", liger.get(name))):
            if fn is None:
                continue
            run = _fwd_bwd(lambda fn=fn: ((), fn))
            try:
                row[f"{label}_ms"] = round(
                    triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median"), 4
                )
                row[f"{label}_kernels"] = _count_kernels(run)
            except Exception as err:
                row[f"{label}_error"] = repr(err)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'op':38s} {'ours ms':>9s} {'torch ms':>9s} {'liger ms':>9s} {'ours k':>7s} {'torch k':>8s}")
    for r in rows:
        print(
            f"{r['op']:38s} {r.get('ours_ms', float('nan')):9.3f} {r.get('torch_ms', float('nan')):9.3f} "
            f"{r.get('liger_ms', float('nan')):9.3f} {r.get('ours_kernels', -1):7d} {r.get('torch_kernels', -1):8d}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
