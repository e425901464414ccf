"""DDP throughput scaling of a random-weight Qwen2.5-VL-7B-shaped QLoRA from 1 to 2 GPUs.

    python bench/ddp_scaling.py --model-dir /tmp/vft-qwen25vl-7b --workload headline \
        --gpus 1,2 --log ddp_scaling.log --json ddp_scaling.json

The parent process builds the model folder once (``bench/qlora_step.py``'s builder: 8.29 B parameters,
bf16, seed 0, stand-in processor), then launches one ``torchrun --standalone --nproc_per_node N`` per
entry of ``--gpus`` and of ``--engines``. Each rank loads its own 4-bit copy onto its own GPU
(``device_map={"": LOCAL_RANK}`` via ``visionft.engine.distributed.device_map``), adds LoRA r=16 / alpha=16 on all
linear layers (vision tower kept in 16 bit, NF4 double-quant language model, non-reentrant activation
checkpointing) and runs a visible loop: forward, backward, gradient averaging, 8-bit AdamW step. Engines:

- ``plain`` / ``engine``: the model (without / with visionft's kernels) wrapped in
  ``DistributedDataParallel`` (NCCL, ``find_unused_parameters=False``: only the LoRA weights require
  grad, so only they are all-reduced, from DDP's hooks during backward); eager steps.
- ``graphs``: what ``visionft-train`` runs under torchrun with the optimizations on
  (``visionft.engine.trainer``): forward + backward replayed from a CUDA graph on the unwrapped model, then one
  NCCL all-reduce of all LoRA gradients as one flat buffer (``visionft.engine.grad_sync``), and the
  sync-free 8-bit AdamW (``visionft.engine.optim``).

Weak scaling: every rank keeps the per-device batch of the workload, so N GPUs process N times the tokens
per step. Reported per N: median s/step over the timed steps (the slowest rank's, after a barrier), the
job's tokens/s (sum over ranks, ``visionft.engine.distributed.aggregate_tokens_per_second``), peak memory per
rank; then scaling = tokens/s(N) / tokens/s(1). The goal is >= 1.8x at N=2.

Each rank uses the same batch content (``qlora_step.make_batch``, seed 0): throughput does not depend on
the values, and the ranks' gradients still all-reduce in full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import qlora_step  # noqa: E402  (bench/qlora_step.py: model folder, batch, environment line)


def _load(folder: Path, engine: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    from visionft.engine import distributed

    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        quantization_config=qlora_step._bnb_config(),
        dtype=torch.bfloat16,
        device_map=distributed.device_map(),
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)  # the same LoRA init on every rank (DDP also broadcasts rank 0's at wrap time)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    if engine in ("engine", "graphs"):
        from visionft.patching import apply_optimizations

        # No embedding offload, so that 1 and N processes run the same model (it is skipped under
        # DDP, whose wrapper refuses a parameter on the host).
        apply_optimizations(model, offload_embeddings=False)
    return model


def _step_function(args, model, batch):
    """(forward + backward + gradient averaging, optimizer) for the engine."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from visionft.engine import distributed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.engine == "graphs":
        # visionft.engine.trainer's data-parallel path: CUDA-graph forward + backward on the unwrapped model,
        # then one all-reduce of the flat LoRA gradients (visionft.engine.grad_sync); no DDP hooks.
        from visionft.engine.cuda_graphs import CudaGraphTrainStep
        from visionft.engine.grad_sync import FlatGradientAllReduce
        from visionft.engine.optim import adamw_8bit
        from visionft.patching import patch_report

        for p in trainable:  # the same start on every rank, as DDP's constructor gives
            dist.broadcast(p.data, src=0)
        step = CudaGraphTrainStep(model, patch_report(model), warmup=2)
        if step.disabled:
            raise RuntimeError(f"CUDA graphs unavailable: {step.disabled}")
        sync = FlatGradientAllReduce(trainable)

        def graphed():
            loss = step(batch)
            sync()
            return loss

        return graphed, adamw_8bit(trainable, lr=2e-4), step
    ddp = DDP(model, device_ids=[distributed.local_rank()], find_unused_parameters=False)
    ddp.train()

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ddp(**batch).loss
        loss.backward()
        return loss.detach()

    return eager, bnb.optim.AdamW8bit(trainable, lr=2e-4), None


def worker(args) -> None:
    """One rank under torchrun: the timed data-parallel loop; rank 0 writes the result JSON."""
    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor
    from visionft.engine import distributed

    torch.cuda.set_device(distributed.local_rank())  # make_batch's .cuda() and NCCL use this rank's GPU
    dist.init_process_group(backend="nccl", device_id=distributed.device())
    folder = Path(args.model_dir)
    processor = AutoProcessor.from_pretrained(folder)
    batch = qlora_step.make_batch(processor, args.workload)
    tokens_per_step = int(batch["attention_mask"].sum())

    model = _load(folder, args.engine)
    reduced = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    forward_backward, opt, graph_step = _step_function(args, model, batch)

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - t0], device=distributed.device())
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        if step >= args.warmup:
            times.append(elapsed.item())

    median = statistics.median(times)
    job_tps = distributed.aggregate_tokens_per_second(tokens_per_step, median)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=distributed.device())
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if distributed.is_main_process():
        Path(args.result).write_text(
            json.dumps(
                {
                    "gpus": distributed.world_size(),
                    "engine": args.engine,
                    "workload": args.workload,
                    "tokens_per_rank_step": tokens_per_step,
                    "median_s_per_step": median,
                    "tokens_per_second": job_tps,
                    "peak_allocated_gib_max_rank": round(peak.item(), 2),
                    "all_reduced_parameters": reduced,
                    "losses": losses,
                    "cuda_graphs": None
                    if graph_step is None
                    else {"captured": graph_step.captured, "replays": graph_step.replays},
                    "env": qlora_step._env_line(),
                },
                indent=1,
            )
        )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/vft-qwen25vl-7b")
    p.add_argument("--workload", default="headline", choices=sorted(qlora_step.WORKLOADS))
    p.add_argument("--gpus", default="1,2", help="comma-separated process counts, one run each")
    p.add_argument(
        "--engines",
        default="graphs",
        help="comma-separated: plain, engine (DDP, eager), graphs (CUDA-graph steps + flat all-reduce)",
    )
    p.add_argument("--engine", default="graphs", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900, help="seconds per torchrun")
    p.add_argument("--log", default="ddp_scaling.log")
    p.add_argument("--json", default="ddp_scaling.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    folder = Path(args.model_dir)
    if not folder.is_dir():
        qlora_step.build_model_folder(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = []
    with open(args.log, "a") as log:
        for engine in args.engines.split(","):
            for n in [int(x) for x in args.gpus.split(",")]:
                result = Path(args.json).with_suffix(f".{engine}.gpus{n}.json")
                cmd = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                    str(Path(__file__).resolve()), "--worker", "--result", str(result),
                    "--model-dir", str(folder), "--workload", args.workload,
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--engine", engine,
                ]  # fmt: skip
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.run(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
                )
                if proc.returncode != 0 or not result.is_file():
                    results.append(
                        {"gpus": n, "engine": engine, "error": f"exit {proc.returncode}, see {args.log}"}
                    )
                else:
                    results.append(json.loads(result.read_text()))
                print(json.dumps(results[-1] | {"losses": "..."}), flush=True)
    for r in results:
        base = next(
            (
                b
                for b in results
                if b.get("gpus") == 1 and b["engine"] == r["engine"] and "tokens_per_second" in b
            ),
            None,
        )
        if base and "tokens_per_second" in r:
            r["scaling_vs_1_gpu"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
            r["efficiency"] = round(r["scaling_vs_1_gpu"] / r["gpus"], 3)
    Path(args.json).write_text(json.dumps(results, indent=1))
    for r in results:
        print(
            f"{r['engine']} gpus={r['gpus']}: "
            + (
                r["error"]
                if "error" in r
                else f"{r['median_s_per_step']:.3f} s/step, {r['tokens_per_second']:.0f} tok/s, "
                f"scaling {r.get('scaling_vs_1_gpu')}x, peak {r['peak_allocated_gib_max_rank']} GiB"
            )
        )


if __name__ == "__main__":
    main()
