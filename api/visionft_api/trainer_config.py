"""The trainer's config file: a recipe plus where the trainer runs and whom it reports to.

The operator renders this into the ConfigMap that the training pod mounts (no secrets: the pod's storage
credentials arrive as environment variables from a secretKeyRef). The same file format drives a local run
(``visionft-train config.yaml``); ``visionft-train`` also takes a VisionFineTune manifest, whose recipe it
turns into this config with ``TrainerConfig.from_recipe`` (``visionft.job.config_file``), as the operator
does.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from visionft_api.recipe import SpecModel, TrainingRecipe


class StatusTarget(SpecModel):
    """The VisionFineTune whose status.progress the trainer updates through the apiserver."""

    namespace: str = Field(max_length=63, description="namespace of the resource.")
    name: str = Field(max_length=253, description="name of the resource.")


class RuntimeSettings(SpecModel):
    """Where the trainer works and how it reports. Filled by the operator; defaults suit a laptop."""

    work_dir: str = Field(
        "./runs/work",
        description="workDir is local scratch for the synced or generated dataset and model, and the "
        "output folder when the recipe sets no output.",
    )
    json_progress: bool = Field(False, description="jsonProgress prints one JSON line per report.")
    run_name: str | None = Field(
        None,
        max_length=253,
        description="runName names the run in its reports and trackers: the VisionFineTune's name.",
    )
    status_target: StatusTarget | None = Field(
        None, description="statusTarget, when set, receives progress through server-side apply."
    )


class TrainerConfig(TrainingRecipe):
    """The whole config file of ``visionft-train``."""

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings, description="runtime settings.")

    @classmethod
    def from_recipe(cls, recipe: TrainingRecipe, runtime: RuntimeSettings) -> TrainerConfig:
        """The recipe part of ``recipe`` (a VisionFineTune spec carries cluster fields too), plus
        ``runtime``."""
        fields = {field.alias or name for name, field in TrainingRecipe.model_fields.items()}
        raw = {key: value for key, value in recipe.to_dict().items() if key in fields}
        raw["runtime"] = runtime.to_dict()
        return cls.model_validate(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainerConfig:
        """Read a YAML or JSON config; relative local paths are resolved against the file's folder."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"trainer config {path} does not exist: pass --config FILE") from None
        if not isinstance(raw, dict):
            raise ValueError(f"trainer config {path} must be a mapping of fields, got {type(raw).__name__}")
        base = path.resolve().parent
        for section in ("model", "dataset", "output"):
            uri = (raw.get(section) or {}).get("uri")
            if isinstance(uri, str) and _is_relative_local(uri):
                raw[section]["uri"] = str((base / uri).resolve())
        runtime = raw.get("runtime") or {}
        if isinstance(runtime.get("workDir"), str) and _is_relative_local(runtime["workDir"]):
            runtime["workDir"] = str((base / runtime["workDir"]).resolve())
        return cls.model_validate(raw)


def _is_relative_local(uri: str) -> bool:
    # "org/name" hub ids are not relative paths: only ./ and ../ forms are treated as local.
    return uri.startswith("./") or uri.startswith("../")
