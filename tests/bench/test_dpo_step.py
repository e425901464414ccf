"""bench/dpo_step.py's CPU path (``--tiny``): both engines, plain TRL and this engine's, train on the same
pair, start at log 2 (the policy is the reference) and follow the same loss curve (fp32, same init, same
objective); TRL keeps a copied "ref" adapter, this engine none."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dpo_bench_runs_both_engines_on_cpu(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "dpo_step.py"),
            "--tiny",
            "--model-dir",
            str(tmp_path / "model"),
            "--work-dir",
            str(tmp_path / "work"),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--log",
            str(tmp_path / "dpo.log"),
            "--json",
            str(tmp_path / "dpo.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {r["engine"]: r for r in json.loads((tmp_path / "dpo.json").read_text())}
    assert set(runs) == {"trl", "engine"}
    for run in runs.values():
        assert len(run["losses"]) == 3 and run["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
        assert run["step_s_median"] > 0 and run["tokens"] > 0
    assert runs["trl"]["losses"] == pytest.approx(runs["engine"]["losses"], rel=1e-4)
    assert runs["trl"]["losses"][-1] < runs["trl"]["losses"][0]
    assert runs["trl"]["adapters"] == ["default", "ref"] and runs["engine"]["adapters"] == ["default"]
    assert "| engine |" in result.stdout
