"""DDP on CPU (gloo, 2 processes under torchrun) trains a tiny Qwen2-VL with the same loss curve as one
process with twice the batch, on padded batches and on fixed-shape rows; only LoRA weights are all-reduced; a checkpoint from 2 ranks resumes in
1 process, with rank 0's RNG; every rank's RNG state reaches rank 0's checkpoint and its S3 upload when
ranks write to separate disks.

Most tests run ``tests/trainer/engine/ddp_driver.py`` (public API + TRL ``SFTTrainer``), whose records per rank
and RNG probe the ``visionft-train`` CLI does not have; the last one runs the CLI itself under torchrun.
Both write outputs from rank 0 only.

Tolerance. Both runs are fp32 on the same seed and the same LoRA init, and each step sees the same
samples (checked, not assumed). The loss is token-normalised over the global batch in both cases
(``average_tokens_across_devices``: each rank divides its summed token loss by the token count of all
ranks, and DDP's mean over 2 ranks is undone by the Trainer's ×world-size), so the ranks' different
supervised-token counts do not change the objective. What remains is floating-point order: each rank
pads its 2 samples to its own longest sequence instead of the longest of 4, and the gradient is summed
as (rank 0 + rank 1) / 2 instead of over one batch. That differs at ~1e-7 relative; step 1 (identical
weights) must agree to 1e-5 absolute. AdamW then turns tiny differences in near-zero gradient entries into
updates of full size ``lr``, so the curves drift apart slowly: measured at lr 5e-3 over 6 steps, at most
0.18 % relative (loss 7.03 -> 2.68). The test allows 1 % relative per step.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from visionft.engine import distributed
from visionft.testing.tiny import save_tiny_vlm

from tests.trainer.engine.ddp_driver import rng_digests

DRIVER = Path(__file__).with_name("ddp_driver.py")
REPO = Path(__file__).resolve().parents[3]
STEPS, BATCH = 6, 2
STEP1_ATOL = 1e-5
RTOL = 1e-2
#: Rows on two ranks against rows in one process (test_rows_on_two_ranks_train_like_one_process_...).
ROW_RTOL = 1e-3
#: A checkpoint of 2 ranks: each rank's RNG file, and rank 0's state under the single-process name.
RNG_FILES_OF_TWO_RANKS = ["rng_state.pth", "rng_state_0.pth", "rng_state_1.pth"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(model: Path, out: Path, nproc: int, batch: int, *extra: str, env: dict | None = None) -> list[dict]:
    driver = [str(DRIVER), "--model", str(model), "--out", str(out), "--batch", str(batch), *extra]
    if nproc == 1:
        cmd = [sys.executable, *driver]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += driver
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("ddp-tiny"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """One process with batch 2B and two gloo ranks with batch B, same seed, same steps."""
    root = tmp_path_factory.mktemp("ddp-runs")
    return {
        "single": _run(model_dir, root / "single", 1, 2 * BATCH, "--steps", str(STEPS)),
        "ddp": _run(model_dir, root / "ddp", 2, BATCH, "--steps", str(STEPS)),
    }


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_each_step_sees_the_same_samples(runs):
    (single,), (r0, r1) = runs["single"], runs["ddp"]
    for step in range(STEPS):
        assert len(r0["indices"][step]) == len(r1["indices"][step]) == BATCH
        assert set(r0["indices"][step]).isdisjoint(r1["indices"][step])
        # accelerate deals consecutive per-device batches of one seeded order: rank 0 the first B, rank 1
        # the next B; one process with batch 2B takes both, in that order.
        assert r0["indices"][step] + r1["indices"][step] == single["indices"][step], step


def test_two_ranks_match_one_process_with_twice_the_batch(runs):
    (single,), (r0, r1) = runs["single"], runs["ddp"]
    assert single["steps"] == r0["steps"] == list(range(1, STEPS + 1))
    assert r0["global_step"] == r1["global_step"] == single["global_step"] == STEPS
    # The logged loss is gathered over ranks, so both ranks report the same curve.
    assert r0["losses"] == r1["losses"]
    assert abs(r0["losses"][0] - single["losses"][0]) < STEP1_ATOL
    diffs = [_rel(d, s) for d, s in zip(r0["losses"], single["losses"], strict=True)]
    assert max(diffs) < RTOL, list(zip(r0["losses"], single["losses"], strict=True))
    # ... and it trains: the curve falls well below its start.
    assert r0["losses"][-1] < 0.6 * r0["losses"][0], r0["losses"]
    # The ranks' supervised-token counts differ on some step (so token normalisation is exercised).
    assert any(a != b for a, b in zip(r0["supervised"], r1["supervised"], strict=False))


@pytest.fixture(scope="module")
def flat_run(model_dir, tmp_path_factory) -> list[dict]:
    """Two gloo ranks through visionft's trainer: the step outside DDP's hooks, one flat all-reduce.

    The optimizations are on but no Triton kernel runs (no interpreter in this run), so the modules
    are the plain ones of the other runs and what is compared is the gradient averaging alone.
    """
    root = tmp_path_factory.mktemp("ddp-flat")
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    return _run(model_dir, root, 2, BATCH, "--steps", str(STEPS), "--trainer", "visionft", env=env)


def test_flat_all_reduce_trains_like_one_process_with_twice_the_batch(runs, flat_run):
    """visionft.engine.trainer under DDP: the path CUDA-graph steps use (eager here, on CPU) gives DDP's curve."""
    (single,), (ddp, _), (r0, r1) = runs["single"], runs["ddp"], flat_run
    # It took the engine's path: one averaging all-reduce per optimizer step, on both ranks.
    assert r0["flat_allreduce_calls"] == r1["flat_allreduce_calls"] == STEPS
    assert r0["indices"] == ddp["indices"]
    assert r0["losses"] == r1["losses"]
    # Step 1 runs on identical weights: the same loss as DDP's hooks and as one process.
    assert abs(r0["losses"][0] - ddp["losses"][0]) < STEP1_ATOL
    assert abs(r0["losses"][0] - single["losses"][0]) < STEP1_ATOL
    diffs = [_rel(d, s) for d, s in zip(r0["losses"], single["losses"], strict=True)]
    assert max(diffs) < RTOL, list(zip(r0["losses"], single["losses"], strict=True))
    assert r0["losses"][-1] < 0.6 * r0["losses"][0], r0["losses"]


@pytest.fixture(scope="module")
def row_runs(model_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """Fixed-shape rows (``visionft.data.rows``) through visionft's trainer (the row forward, eager on
    CPU): one process with batch 2B and two gloo ranks with batch B (one flat all-reduce per step).

    The rows are sized for 2B samples with room to spare, so every micro-batch fills exactly one row of
    tier 0: the single process's 2B samples, or each rank's B.
    """
    root = tmp_path_factory.mktemp("ddp-rows")
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    extra = ("--steps", str(STEPS), "--trainer", "visionft", "--rows", str(2 * BATCH))
    return {
        "single": _run(model_dir, root / "single", 1, 2 * BATCH, *extra, env=env),
        "ddp": _run(model_dir, root / "ddp", 2, BATCH, *extra, env=env),
    }


def test_rows_on_two_ranks_train_like_one_process_with_twice_the_batch(row_runs):
    """The row path under DDP against one process on rows with twice the data. The row loss divides by
    the Trainer's supervised-token count over both ranks, so the objective is the same; what differs is
    floating-point order (two rows of B samples and the averaged gradient, against one row of 2B).
    Measured: step 1 equal to the last bit, at most 2.3e-7 relative over 6 steps; allowed: 1e-5 absolute
    at step 1 and ``ROW_RTOL`` per step (the AdamW drift of the padded batches, 0.18 %, stays well
    inside it)."""
    (single,), (r0, r1) = row_runs["single"], row_runs["ddp"]
    # Every step trained one row per process, of exactly that micro-batch (nothing carried over).
    for run, batch in ((single, 2 * BATCH), (r0, BATCH), (r1, BATCH)):
        assert run["row_summary"]["rows"] == run["row_summary"]["tier_rows"][0] == STEPS
        assert run["row_samples"][:STEPS] == [batch] * STEPS
    assert r0["flat_allreduce_calls"] == r1["flat_allreduce_calls"] == STEPS
    for step in range(STEPS):
        assert r0["indices"][step] + r1["indices"][step] == single["indices"][step], step
    assert r0["losses"] == r1["losses"]
    assert abs(r0["losses"][0] - single["losses"][0]) < STEP1_ATOL
    diffs = [_rel(d, s) for d, s in zip(r0["losses"], single["losses"], strict=True)]
    assert max(diffs) < ROW_RTOL, list(zip(r0["losses"], single["losses"], strict=True))
    assert r0["losses"][-1] < 0.6 * r0["losses"][0], r0["losses"]


def test_only_lora_weights_are_all_reduced(runs):
    for rank in runs["ddp"]:
        assert rank["all_trainable_are_lora"]
        assert rank["trainable"] > 0
        assert rank["ddp_reduced_params"] == rank["trainable"]
    assert runs["single"][0]["ddp_reduced_params"] is None  # not wrapped in one process


def test_checkpoint_from_two_ranks_resumes_in_one_process(model_dir, runs, tmp_path):
    half = STEPS // 2
    out = tmp_path / "resume"
    _run(model_dir, out, 2, BATCH, "--steps", str(half), "--save-steps", str(half))
    ckpt = out / "checkpoints" / f"checkpoint-{half}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == half
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == RNG_FILES_OF_TWO_RANKS
    # A single process (the Trainer reads rng_state.pth) continues with rank 0's RNG, not a fresh one.
    rank0 = rng_digests(torch.load(ckpt / "rng_state_0.pth", weights_only=False))
    assert _hf_restores(ckpt, 0, world_size=1) == rank0

    (resumed,) = _run(model_dir, out, 1, 2 * BATCH, "--steps", str(STEPS), "--resume")
    (single,) = runs["single"]
    assert resumed["resumed_from"] == str(ckpt)
    assert resumed["global_step"] == STEPS
    # The resumed process continues the same sample order: steps half+1.. see what the
    # uninterrupted single-process run saw (the checkpoint's steps are replayed from its log history).
    assert resumed["indices"][: STEPS - half] == single["indices"][half:STEPS]
    tail = resumed["losses"][half:]
    diffs = [_rel(r, s) for r, s in zip(tail, single["losses"][half:], strict=True)]
    assert len(tail) == STEPS - half and max(diffs) < RTOL, (tail, single["losses"][half:])


def _hf_restores(checkpoint: Path, process_index: int, world_size: int) -> dict[str, str]:
    """The RNG digests after the Trainer's own ``_load_rng_state`` restores ``checkpoint`` as rank
    ``process_index`` of ``world_size`` (1: a single process); this process's RNG states are put back
    afterwards."""
    from transformers import Trainer
    from transformers.training_args import ParallelMode

    mode = ParallelMode.DISTRIBUTED if world_size > 1 else ParallelMode.NOT_PARALLEL
    args = SimpleNamespace(world_size=world_size, process_index=process_index, parallel_mode=mode)
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        Trainer._load_rng_state(SimpleNamespace(args=args), str(checkpoint))
        return rng_digests(
            {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        )
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


@pytest.mark.s3
def test_every_ranks_rng_state_reaches_rank_zeros_checkpoint_and_upload(model_dir, tmp_path, s3_bucket):
    """Two nodes, simulated: rank 1 writes its checkpoint files to its own folder. Rank 0's checkpoint and
    its S3 upload still hold rank 1's RNG state, as rank 1 had it at the save, and the Trainer's own
    loader restores it from there."""
    from visionft.storage import MANIFEST_NAME, make_client
    from visionft.storage.checkpoints import step_name

    step, out = 2, tmp_path / "nodes"
    extra = ["--steps", str(step), "--save-steps", str(step), "--separate-disks", "--rng-probe"]
    r0, r1 = _run(model_dir, out, 2, BATCH, *extra, "--s3-output", s3_bucket.uri("run/"))
    ckpt0 = out / "checkpoints" / f"checkpoint-{step}"
    ckpt1 = out / "node1" / "checkpoints" / f"checkpoint-{step}"
    # Rank 1's disk holds only its own RNG file (the Trainer saves the rest from rank 0 alone) ...
    assert [p.name for p in ckpt1.iterdir()] == ["rng_state_1.pth"]
    # ... and rank 0's checkpoint holds both ranks' files, rank 1's byte for byte (and rank 0's state for a
    # single process).
    assert sorted(p.name for p in ckpt0.glob("rng_state*")) == RNG_FILES_OF_TWO_RANKS
    assert (ckpt0 / "rng_state_1.pth").read_bytes() == (ckpt1 / "rng_state_1.pth").read_bytes()

    at_save = [r0["rng_at_save"][str(step)], r1["rng_at_save"][str(step)]]
    assert all(at_save[0][k] != at_save[1][k] for k in at_save[0])  # the probe made the ranks differ
    for rank in (0, 1):
        assert rng_digests(torch.load(ckpt0 / f"rng_state_{rank}.pth", weights_only=False)) == at_save[rank]
        assert _hf_restores(ckpt0, rank, world_size=2) == at_save[rank]
    assert _hf_restores(ckpt0, 0, world_size=1) == at_save[0]

    # The upload (rank 0's callback, after the gather) holds all three files.
    client, prefix = make_client(), f"run/checkpoints/{step_name(step)}/"
    listing = client.list_objects_v2(Bucket=s3_bucket.name, Prefix=prefix).get("Contents", [])
    keys = {item["Key"].removeprefix(prefix) for item in listing}
    assert {*RNG_FILES_OF_TWO_RANKS, "trainer_state.json", MANIFEST_NAME} <= keys, keys
    uploaded = client.get_object(Bucket=s3_bucket.name, Key=prefix + "rng_state_1.pth")["Body"].read()
    assert uploaded == (ckpt1 / "rng_state_1.pth").read_bytes()


def test_rng_gather_does_nothing_in_a_single_process(tmp_path):
    from visionft.engine.checkpoint_rng import GatherRngStatesCallback

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    state = SimpleNamespace(global_step=3)
    for world_size in (1, 2):  # a single process; and a world size without a process group
        args = SimpleNamespace(world_size=world_size, process_index=0, output_dir=str(tmp_path))
        GatherRngStatesCallback().on_save(args, state, None)
    assert list(ckpt.iterdir()) == []


def test_the_single_process_rng_state_keeps_only_the_ranks_own_device():
    from visionft.engine.checkpoint_rng import single_process_state

    devices = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]  # get_rng_state_all(), 3 GPUs
    states = {"python": (3, (1, 2), None), "numpy": ("MT19937",), "cpu": torch.zeros(2), "cuda": devices}
    one = single_process_state(states, device_index=1)
    assert one["cuda"] is devices[1]  # what get_rng_state() of the rank's current device gave
    assert all(one[k] is states[k] for k in ("python", "numpy", "cpu"))
    assert states["cuda"] is devices  # the rank's own dict is left as it was
    assert single_process_state({"cpu": states["cpu"]}, 0) == {"cpu": states["cpu"]}  # no accelerator


def test_rank_helpers_read_the_torchrun_environment(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.ddp_training_kwargs() == {}
    assert distributed.setup() is False  # a single process creates no group
    assert distributed.all_reduce_sum(3.5) == 3.5  # no process group: itself
    assert distributed.aggregate_tokens_per_second(100, 0.5) == 200.0
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (distributed.rank(), distributed.local_rank(), distributed.world_size()) == (5, 1, 8)
    assert not distributed.is_main_process()
    assert not distributed.is_local_main_process()
    assert distributed.ddp_training_kwargs() == {
        "ddp_backend": distributed.backend(),
        "ddp_find_unused_parameters": False,
    }


def test_cli_under_torchrun_writes_outputs_from_rank_zero_only(model_dir, tmp_path) -> None:
    """The real `visionft-train` under torchrun (2 gloo ranks): it trains, rank 0 alone prints progress
    lines and writes the summary, adapter and checkpoints, and every rank exits cleanly."""
    from tests.trainer.job.test_cli import config, progress_lines

    path = config(tmp_path, lambda arch: model_dir, maxSteps=8, loggingSteps=2, checkpointEverySteps=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "visionft.cli", "--config", str(path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # One progress line per logging step: rank 1 prints none.
    assert [r["step"] for r in progress_lines(proc.stdout)] == [2, 4, 6, 8]
    # The evaluation (dataset.evalSamples 4): each rank generates its share, rank 0 alone prints and writes.
    assert proc.stdout.count("evaluation of the output") == 1
    out = tmp_path / "out"
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-8"]
    # HF Trainer saves one RNG state per rank into rank 0's checkpoint folder (same disk here); the gather
    # adds rank 0's for a single process.
    ckpt = out / "checkpoints" / "checkpoint-8"
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == RNG_FILES_OF_TWO_RANKS
