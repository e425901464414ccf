"""Resume equals uninterrupted: 2N steps in one go, and N steps + a lost pod + N more from the S3 checkpoint,
end with the same adapter weights (tiny model, CPU, fixed seed), for supervised and for preference (DPO)
training.

The "lost pod" is a second run with an empty work folder: nothing local survives, so the resume point can
only come from S3 (`visionft.storage.checkpoint_callback` fetches it before HF Trainer looks for one). The
checkpoints, local and in S3, hold no Hub model card (`visionft.engine.model_cards`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness.s3_fixtures import S3Bucket

torch = pytest.importorskip("torch")
run = pytest.importorskip("visionft.job.run")
pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402
from visionft import storage  # noqa: E402
from visionft.storage.hf_callback import S3CheckpointCallback  # noqa: E402
from visionft_api.trainer_config import TrainerConfig  # noqa: E402

pytestmark = [pytest.mark.s3, pytest.mark.slow]

N = 3  # steps before the interruption; the full run is 2N


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from visionft.data.synthetic import make_shapes_dataset, make_shapes_preference_dataset
    from visionft.testing.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("resume-assets")
    make_shapes_dataset(root / "data", train_size=24, test_size=4, image_size=56, task="colour", seed=0)
    make_shapes_preference_dataset(root / "pairs", train_size=24, test_size=4, image_size=56, seed=0)
    save_tiny_vlm("qwen2_vl", root / "model", seed=0)
    return root / "data", root / "pairs", root / "model"


def make_config(work: Path, output_uri: str, data: Path, model: Path, method: str = "sft") -> TrainerConfig:
    columns = {"image": "image", "instruction": "instruction", "response": "response"}
    if method == "dpo":
        columns.update(chosen="chosen", rejected="rejected")
    return TrainerConfig.model_validate(
        {
            "method": method,
            "model": {"uri": str(model), "loadIn4bit": False, "maxSeqLength": 256},
            "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
            "dataset": {
                "uri": str(data),
                "format": "imagefolder",
                "columns": columns,
                "maxImagePixels": 3136,
                "evalSamples": 0,
            },
            "training": {
                "maxSteps": 2 * N,
                "perDeviceBatchSize": 2,
                "learningRate": 5.0e-3,
                "warmupSteps": 1,
                "lrScheduler": "linear",
                "optimizer": "adamw_torch",
                "gradientCheckpointing": "off",
                "checkpointEverySteps": N,
                "keepCheckpoints": 2,
                "loggingSteps": 1,
                "seed": 3407,
                "optimizations": False,
            },
            "output": {"uri": output_uri, "saveMethod": "lora"},
            "runtime": {"workDir": str(work)},
        }
    )


class _StopAt(S3CheckpointCallback):
    """Ends training right after step `stop` (its checkpoint is saved and uploaded first): the pod dies."""

    def __init__(self, inner: S3CheckpointCallback, stop: int) -> None:
        super().__init__(inner.manager)
        self.stop = stop

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.stop:
            control.should_training_stop = True


def adapter(work: Path) -> dict[str, Any]:
    return load_file(str(work / "output" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resume_from_s3_equals_uninterrupted(
    s3_bucket: S3Bucket,
    tmp_path: Path,
    assets: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    answers, pairs, model = assets
    data = pairs if method == "dpo" else answers
    torch.set_num_threads(1)
    lines: list[str] = []

    def config(work: str, prefix: str) -> TrainerConfig:
        return make_config(tmp_path / work, s3_bucket.uri(prefix), data, model, method)

    run.train(config("a", "a/"), echo=lines.append)
    straight = adapter(tmp_path / "a")

    original = storage.checkpoint_callback
    monkeypatch.setattr(storage, "checkpoint_callback", lambda *a, **k: _StopAt(original(*a, **k), N))
    run.train(config("b1", "b/"), echo=lines.append)
    monkeypatch.setattr(storage, "checkpoint_callback", original)
    manager = storage.CheckpointManager(s3_bucket.uri("b/"))
    latest = manager.find_latest_complete()
    assert latest is not None and latest.step == N
    halfway = adapter(tmp_path / "b1")
    assert any(not torch.allclose(halfway[k], straight[k]) for k in straight), "steps N+1..2N changed nothing"
    shutil.rmtree(tmp_path / "b1")  # the pod and its disk are gone

    lines.clear()
    result = run.train(config("b2", "b/"), echo=lines.append)
    assert any("resuming from" in line and f"checkpoint-{N}" in line for line in lines), lines
    assert result.steps == 2 * N
    resumed = adapter(tmp_path / "b2")
    assert straight.keys() == resumed.keys() and straight
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run's final outputs are published with a manifest, and its newest checkpoint is 2N.
    assert storage.verify_prefix(s3_bucket.uri("b/"))
    assert [c.step for c in manager.list_checkpoints()] == [N, 2 * N]
    # No Hub model card (TRL's or PEFT's README.md) in the checkpoints, local or uploaded.
    keys = s3_bucket.server.list_keys(s3_bucket.name, "b/checkpoints/")
    assert any(key.endswith("/adapter_model.safetensors") for key in keys), keys
    assert not [key for key in keys if key.endswith("README.md")], keys
    assert not list((tmp_path / "b2" / "output" / "checkpoints").rglob("README.md"))
