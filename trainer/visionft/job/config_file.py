"""What ``visionft-train FILE`` reads: a trainer config, or a VisionFineTune manifest.

- A trainer config (``visionft_api.trainer_config.TrainerConfig``): the recipe plus ``runtime``; what the
  operator mounts into the training pod. Relative local paths are taken from the file's folder.
- A VisionFineTune manifest (``kind: VisionFineTune``), the same file that ``kubectl apply`` takes: its
  ``spec`` is validated as the apiserver's schema would (``VisionFineTuneSpec``), and the recipe part of it
  becomes the trainer config, as the operator builds it. The work folder is ``runs/<metadata.name>/`` under
  the current directory. The cluster-only fields (resources, runPolicy, queueName, suspend, image, and
  the Secret and ConfigMap names of ``storage``) mean nothing on this machine: they are listed in one log
  line and ignored. S3 credentials come from the environment (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, or the AWS credential chain), never from the named Secret.

Torch-free: bad input fails here, before the trainer loads anything, with one line naming the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from visionft_api import API_VERSION, KIND, RuntimeSettings, TrainerConfig, VisionFineTuneSpec
from visionft_api.recipe import TrainingRecipe

_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# Storage fields that name cluster objects (resolved by the operator and the kubelet, not by the trainer).
_CLUSTER_STORAGE_FIELDS = ("credentialsSecret", "accessKeyIdKey", "secretAccessKeyKey", "caBundleConfigMap")


class ConfigFileError(ValueError):
    """The file can't be run as written; the message is one line that names the field."""


@dataclass
class LoadedConfig:
    """A file turned into a trainer config.

    Attributes:
        config (TrainerConfig): what ``visionft.job.run.train`` runs.
        kind (str): ``"VisionFineTune"`` or ``"trainer config"``.
        notes (list[str]): lines to log: what was ignored, and how to supply what can't be resolved here.
    """

    config: TrainerConfig
    kind: str
    notes: list[str] = field(default_factory=list)


def load(
    path: str | Path, work_dir: str | Path | None = None, env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Reads a trainer config or a VisionFineTune manifest.

    Args:
        path (str | Path): the YAML or JSON file.
        work_dir (str | Path | None): overrides ``runtime.workDir`` (a trainer config) or the default
            ``runs/<metadata.name>`` (a manifest). Default: None.
        env (Mapping[str, str] | None): the environment, for the credentials hint; ``os.environ`` when
            None. Default: None.

    Returns:
        LoadedConfig: the config and the lines to log.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigFileError: the file is not a mapping, not one document, or a field is invalid.
    """
    path = Path(path)
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist: pass --config FILE") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path} is not valid YAML or JSON: {err}") from err
    if len(docs) != 1:
        raise ConfigFileError(f"{path} holds {len(docs)} YAML documents; visionft-train runs exactly one")
    (raw,) = docs
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path} must be a mapping of fields, got {type(raw).__name__}")
    if "kind" in raw or "apiVersion" in raw:
        return _from_manifest(path, raw, work_dir, os.environ if env is None else env)
    try:
        config = TrainerConfig.from_file(path)
    except ValidationError as err:
        raise ConfigFileError(f"invalid trainer config {path}: {_fields(err)}") from None
    if work_dir is not None:
        config.runtime.work_dir = str(Path(work_dir).resolve())
    return LoadedConfig(config, "trainer config")


def _from_manifest(
    path: Path, raw: dict[str, Any], work_dir: str | Path | None, env: Mapping[str, str]
) -> LoadedConfig:
    where = f"VisionFineTune {path}"
    if raw.get("kind") != KIND:
        raise ConfigFileError(
            f"{path}: kind is {raw.get('kind')!r}; visionft-train runs a {KIND} or a trainer config"
        )
    if raw.get("apiVersion") != API_VERSION:
        raise ConfigFileError(
            f"invalid {where}: apiVersion is {raw.get('apiVersion')!r}, expected {API_VERSION}"
        )
    metadata = raw.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not re.fullmatch(_NAME_PATTERN, name) or len(name) > 253:
        raise ConfigFileError(
            f"invalid {where}: metadata.name must be a lowercase DNS name (a-z, 0-9, '-', '.'), got {name!r}"
        )
    unknown = sorted(set(raw) - {"apiVersion", "kind", "metadata", "spec", "status"})
    if unknown:
        raise ConfigFileError(f"invalid {where}: unknown top-level field {unknown[0]}")
    body = raw.get("spec")
    if not isinstance(body, dict):
        raise ConfigFileError(f"invalid {where}: spec is required and must be a mapping")
    try:
        spec = VisionFineTuneSpec.model_validate(body)
    except ValidationError as err:
        raise ConfigFileError(f"invalid {where}: {_fields(err, prefix='spec')}") from None

    folder = Path(work_dir) if work_dir is not None else Path("runs") / name
    runtime = RuntimeSettings(work_dir=str(folder.resolve()), run_name=name)
    notes = []
    recipe_fields = {f.alias or n for n, f in TrainingRecipe.model_fields.items()}
    ignored = [key for key in body if key not in recipe_fields]
    storage = body.get("storage") or {}
    ignored += [f"storage.{key}" for key in _CLUSTER_STORAGE_FIELDS if key in storage]
    if ignored:
        notes.append(
            f"running {KIND} {name} on this machine; its cluster-only fields are ignored: "
            f"{', '.join(ignored)}"
        )
    if spec.uses_s3() and (spec.storage.credentials_secret or spec.storage.ca_bundle_config_map):
        hints = []
        if spec.storage.credentials_secret and not env.get("AWS_ACCESS_KEY_ID"):
            hints.append(
                f"the Secret {spec.storage.credentials_secret} (storage.credentialsSecret) exists only on the "
                "cluster: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use an AWS profile)"
            )
        if spec.storage.ca_bundle_config_map and not env.get("AWS_CA_BUNDLE"):
            hints.append(
                f"the ConfigMap {spec.storage.ca_bundle_config_map} (storage.caBundleConfigMap) exists only "
                "on the cluster: export AWS_CA_BUNDLE=/path/to/ca.crt"
            )
        if hints:
            notes.append("for the S3 locations, " + "; ".join(hints))
    return LoadedConfig(TrainerConfig.from_recipe(spec, runtime), KIND, notes)


def _fields(err: ValidationError, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: ``field.path: message; ...``."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in (prefix, *item.get("loc", ())) if p != "")
        message = str(item.get("msg")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)
