"""``bench/e2e.py --tiny`` on CPU, so that the end-to-end benchmark cannot rot between GPU sessions: each
system runs in its own process through its own path (``visionft-train`` on a manifest, TRL's VLM path),
the shared timer sees every optimizer step, and the JSON holds the numbers the report prints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "llava_next", "pixtral", "mllama"])
def test_the_end_to_end_benchmark_runs_every_system_on_tiny_models(tmp_path, arch):
    steps = 3
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "e2e.py"),
        "--tiny",
        "--arch",
        arch,
        "--steps",
        str(steps),
        "--warmup",
        "1",
        "--samples",
        "24",
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
    ]
    # The CPU path with plain modules (the suite's TRITON_INTERPRET=1 would run every kernel interpreted).
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / f"e2e-{arch}.json").read_text())
    by_system = {r["system"]: r for r in report["results"]}
    assert set(by_system) == {"visionft", "unsloth", "plain"}
    for name in ("visionft", "plain"):
        r = by_system[name]
        assert "error" not in r, r
        assert r["n_steps"] == steps and len(r["losses"]) == steps
        assert all(math.isfinite(x) and x > 0 for x in r["losses"])
        assert r["samples_per_s"] > 0 and r["real_tokens_per_s"] > 0 and r["first_step_s"] > 0
    assert by_system["plain"]["samples_per_step"] == 4.0  # padded batches of perDeviceBatchSize
    ours = by_system["visionft"]
    assert ours["graphs"]["eager_steps"] == steps and ours["rows"]["rows"] == steps  # rows, eager on CPU
    unsloth = by_system["unsloth"]
    assert "samples_per_s" in unsloth or unsloth["error"] == "skipped: unsloth is not installed"
    log = (tmp_path / "out" / f"e2e-{arch}.log").read_text()
    assert "| system | samples/s |" in log and "visionft vs plain" in log
