"""Resume safety: every checkpoint carries a fingerprint of the model and the recipe it was trained
with, and a run refuses to resume from a checkpoint of another model or recipe, with one message that
names ``output.uri`` and what differs.

Without this, re-running into an output folder that holds checkpoints of a different model ends in a
size-mismatch traceback deep in ``load_state_dict``, or, where the shapes happen to agree, silently
continues another run's adapter.

The fingerprint (``visionft_fingerprint.json`` in each ``checkpoint-N`` folder, written by
``FingerprintCallback`` when the Trainer saves, before any upload) holds:

- ``model``: ``model.uri``, the architecture and the config values that shape its weights;
- ``lora``: the recipe fields that decide which adapter tensors exist and how they scale;
- ``optimizer``: its state layout differs between optimizers;
- ``adapter``: the number of trainable tensors and a digest of their names and shapes.

A checkpoint written before fingerprints existed is checked by its adapter file alone: the tensor names
and shapes in ``adapter_model.safetensors`` against the model's trainable ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FINGERPRINT_FILE = "visionft_fingerprint.json"

#: Config values that decide the shapes of a model's weights (text and vision parts alike).
_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "depth",
    "embed_dim",
    "out_hidden_size",
    "patch_size",
    "image_size",
)


class ResumeMismatch(ValueError):
    """The output folder's checkpoint belongs to another model or recipe."""


def _shape_config(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part, sub in (
        ("", config),
        ("text.", getattr(config, "text_config", None)),
        ("vision.", getattr(config, "vision_config", None)),
    ):
        if sub is None:
            continue
        for key in _SHAPE_KEYS:
            value = getattr(sub, key, None)
            if isinstance(value, (int, str)):
                out[part + key] = value
    return out


def _trainable(model: Any) -> dict[str, list[int]]:
    from peft import get_peft_model_state_dict

    try:
        state = get_peft_model_state_dict(model)
    except Exception:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {name: list(t.shape) for name, t in state.items()}


def _digest(shapes: dict[str, list[int]]) -> str:
    text = json.dumps(sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(config: Any, model: Any) -> dict[str, Any]:
    """The fingerprint of this run (module docstring).

    Args:
        config (TrainerConfig): the run's config.
        model: the model with its adapters (PEFT wrapper).
    """
    lora = config.lora
    shapes = _trainable(model)
    return {
        "model": {"uri": config.model.uri, **_shape_config(getattr(model, "config", None))},
        "lora": {
            "r": lora.r,
            "alpha": lora.alpha,
            "bias": lora.bias,
            "use_rslora": lora.use_rslora,
            "target_modules": sorted(lora.target_modules),
            "target_modules_regex": lora.target_modules_regex,
            "finetune_vision_layers": lora.finetune_vision_layers,
            "finetune_language_layers": lora.finetune_language_layers,
            "finetune_attention_modules": lora.finetune_attention_modules,
            "finetune_mlp_modules": lora.finetune_mlp_modules,
            "modules_to_save": sorted(lora.modules_to_save),
        },
        "optimizer": config.training.optimizer,
        "adapter": {"tensors": len(shapes), "digest": _digest(shapes)},
    }


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for section in ("model", "lora", "optimizer", "adapter"):
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    name = (
                        "adapter tensors (names and shapes)"
                        if (section, key) == ("adapter", "digest")
                        else f"{section}.{key}"
                    )
                    if (section, key) == ("adapter", "digest") and a.get("tensors") != b.get("tensors"):
                        continue  # the count already says it
                    out.append(f"{name}: {b.get(key)!r} now, {a.get(key)!r} in the checkpoint")
        elif a != b:
            out.append(f"{section}: {b!r} now, {a!r} in the checkpoint")
    return out


def _adapter_differences(checkpoint: Path, model: Any) -> list[str]:
    path = checkpoint / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    current = _trainable(model)
    if saved == current:
        return []
    missing = sorted(set(current) - set(saved))
    changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    parts = [f"{len(current)} adapter tensors now, {len(saved)} in the checkpoint"]
    if changed:
        k = changed[0]
        parts.append(f"{k}: shape {current[k]} now, {saved[k]} in the checkpoint")
    elif missing:
        parts.append(f"{missing[0]} is not in the checkpoint")
    return parts


def check_resume(checkpoint: Path, current: dict[str, Any], model: Any, output_uri: str) -> None:
    """Refuses to resume from ``checkpoint`` when it belongs to another model or recipe.

    Raises:
        ResumeMismatch: one message naming ``output.uri``, the checkpoint and what differs.
    """
    path = checkpoint / FINGERPRINT_FILE
    if path.is_file():
        differences = _differences(json.loads(path.read_text()), current)
    else:
        differences = _adapter_differences(checkpoint, model)
    if differences:
        raise ResumeMismatch(
            f"output.uri {output_uri} holds {checkpoint.name} of another run, and this run would resume "
            f"from it: {'; '.join(differences)}. Use a new output.uri for this model and recipe, or remove "
            f"the checkpoints/ folder there to start over"
        )


def write_fingerprint(checkpoint: Path, current: dict[str, Any]) -> None:
    (checkpoint / FINGERPRINT_FILE).write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


def fingerprint_callback(current: dict[str, Any]):
    """A ``TrainerCallback`` that writes ``current`` into every checkpoint the Trainer saves (on the main
    process, before later callbacks upload the folder)."""
    from transformers import TrainerCallback

    class FingerprintCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_fingerprint(folder, current)

    return FingerprintCallback()


__all__ = [
    "FINGERPRINT_FILE",
    "ResumeMismatch",
    "check_resume",
    "fingerprint",
    "fingerprint_callback",
    "write_fingerprint",
]
