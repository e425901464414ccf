"""The engine's trainer (``visionft.engine.trainer``) on CPU: with the optimizations on, the optimizer is
made sync-free (``visionft.engine.optim``) for a family without fused kernels too (Qwen3-VL: its row steps
replay from graphs all the same); with them off it is left as the Trainer built it.

bitsandbytes does not run on this CPU, so the optimizer is torch's AdamW and the test records the calls
to ``remove_per_parameter_sync`` (which leaves any other class alone): what is checked is the decision."""

from __future__ import annotations

import datasets
import pytest
from visionft import patching
from visionft.engine import optim
from visionft.engine.options import EngineOptions
from visionft.engine.trainer import vision_sft_trainer_class
from visionft.testing.lora import tiny_lora
from visionft.testing.tiny import build_tiny_vlm


@pytest.mark.parametrize("optimizations", [True, False], ids=["on", "off"])
def test_sync_free_optimizer_follows_the_optimizations_not_the_kernel_patch_set(
    optimizations, tmp_path, monkeypatch
):
    import dataclasses

    from trl import SFTConfig
    from visionft.model import architectures

    # A family without fused kernels (one registered without a patch set).
    plain = dataclasses.replace(architectures.get_arch_spec("llava"), patches=None, modeling={})
    monkeypatch.setitem(architectures._BY_TYPE, "llava", plain)
    model, processor = build_tiny_vlm("llava", seed=0)
    model = tiny_lora(model)
    report = patching.apply_optimizations(model, optimizations=optimizations)
    assert not report.enabled
    calls = []
    monkeypatch.setattr(optim, "remove_per_parameter_sync", lambda opt: calls.append(opt) or False)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        optim="adamw_torch",
    )
    trainer = vision_sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"__index__": [0]}),
        data_collator=lambda features: features,
        processing_class=processor,
        engine_options=EngineOptions.resolve(optimizations=optimizations, env={}),
        patch_report=report,
    )
    optimizer = trainer.create_optimizer()
    assert calls == ([optimizer] if optimizations else [])
    patching.revert_optimizations(model)
