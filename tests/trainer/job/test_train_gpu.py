"""The quickstart task through `visionft-train` on a GPU with everything on: 4-bit base, the fused kernels,
CUDA-graph steps (batch 1, so rows are unpadded: one graph per sequence length) with gradient
accumulation, the sync-free 8-bit AdamW, and gradient checkpointing, evaluated every 50 steps between
graph-captured steps. The held-out exact match (metrics.json) must end far above chance, every evaluation
must have run, and the log must show the graphs captured and replayed. Needs CUDA and bitsandbytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[3]


def test_quickstart_on_gpu_with_cuda_graphs(tmp_path):
    pytest.importorskip("bitsandbytes")
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec = manifest["spec"]
    spec["model"]["loadIn4bit"] = True
    spec["training"].update(
        perDeviceBatchSize=1,
        gradientAccumulationSteps=2,
        maxSteps=250,
        learningRate=4.0e-3,
        optimizer="adamw_8bit",
        gradientCheckpointing="on",
        optimizations=True,
        checkpointEverySteps=100,
    )
    path = tmp_path / "quickstart-gpu.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "visionft.cli", str(path), "--work-dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = result.stdout + result.stderr
    print(
        "\n".join(
            line
            for line in out.splitlines()
            if ("visionft" in line or "evaluation" in line) and "File" not in line
        )
    )
    assert result.returncode == 0, out[-4000:]
    doc = json.loads((tmp_path / "work" / "output" / "metrics.json").read_text())
    before, after = doc["base"]["values"]["exactMatch"], doc["final"]["values"]["exactMatch"]
    assert before < 0.5 and after >= 0.8, (before, after)
    assert [e["step"] for e in doc["history"]] == [50, 100, 150, 200, 250]
    assert (tmp_path / "work" / "output" / "gallery.html").is_file()
    assert "CUDA graphs: captured" in out, out[-4000:]
    assert "(bitsandbytes) without per-parameter device syncs" in out
