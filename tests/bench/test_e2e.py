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


def _e2e_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_repeated_system_gets_its_own_seed_and_a_wrong_name_is_refused():
    e2e = _e2e_module()
    assert e2e.system_seed("plain") == ("plain", e2e.SEED)
    assert e2e.system_seed("plain:2") == ("plain", e2e.SEED + 2)
    for bad in ("plian", "plain:x"):
        with pytest.raises(ValueError, match="unknown system"):
            e2e.system_seed(bad)


def test_the_loss_band_is_plains_spread_and_says_who_is_inside_it():
    e2e = _e2e_module()
    results = [
        {"system": "visionft", "losses": [9.0] * 5 + [2.0] * 10},
        {"system": "plain", "losses": [9.0] * 5 + [2.1] * 10},
        {"system": "plain:1", "losses": [9.0] * 5 + [1.9] * 10},
        {"system": "unsloth", "losses": [9.0] * 5 + [2.5] * 10},
        {"system": "plain:2", "error": "failed"},
    ]
    band = e2e.loss_band(results)
    assert band["plain_band"] == pytest.approx(0.2)
    assert band["from_plain"] == {"visionft": pytest.approx(0.0), "unsloth": pytest.approx(0.5)}
    assert band["within_band"] == {"visionft": True, "unsloth": False}
    assert "plain_band" not in e2e.loss_band(results[:2])  # one plain run has no band
