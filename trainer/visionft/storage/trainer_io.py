"""The storage calls of a training run (``visionft.job.run``), taking the recipe's ``storage`` section.

``settings_from_spec`` maps the VisionFineTune ``spec.storage`` (endpoint, region, addressingStyle, verifyTls)
to ``StorageSettings``. The CA bundle comes from ``AWS_CA_BUNDLE``: the operator mounts
``caBundleConfigMap`` into the pod and points that variable at ``ca.crt``. Credentials come from the
environment (the Secret's keys) or the pod's identity, as everywhere in this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from visionft.storage.checkpoints import CheckpointManager
from visionft.storage.client import make_client
from visionft.storage.settings import StorageSettings
from visionft.storage.sync import download_prefix, upload_folder
from visionft.storage.uri import parse_uri


def settings_from_spec(spec: Any = None) -> StorageSettings:
    """Storage settings from a recipe's ``storage`` section (``visionft_api.StorageSettings``) or None.

    Args:
        spec: an object with ``endpoint``, ``region``, ``addressing_style`` and ``verify_tls``; None reads the
            environment only (``StorageSettings.from_env``).

    Returns:
        StorageSettings: the settings; environment variables fill what the spec leaves empty.
    """
    if spec is None:
        return StorageSettings.from_env()
    endpoint = getattr(spec, "endpoint", None)
    style = getattr(spec, "addressing_style", "auto")
    return StorageSettings.from_env(
        endpoint_url=endpoint,
        region=getattr(spec, "region", None),
        # "auto" with a custom endpoint means path style: self-hosted servers rarely have wildcard DNS.
        path_style=style == "path"
        or (style == "auto" and bool(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3"))),
        verify_tls=getattr(spec, "verify_tls", True),
    )


def sync_down(uri: str, scratch: str | Path, spec: Any = None) -> Path:
    """Download an ``s3://`` dataset or model prefix into ``scratch`` and return the local folder.

    Files already there and unchanged are skipped, and an interrupted sync resumes, so a retried pod
    only fetches what it lacks.
    """
    settings = settings_from_spec(spec)
    target = Path(scratch)
    download_prefix(parse_uri(uri), target, client=make_client(settings))
    return target


def upload_outputs(output_dir: str | Path, output_uri: str, spec: Any = None) -> None:
    """Publish the run's output folder (adapters, merged weights, run.json, loss curve) to ``output_uri``,
    manifest last. The local ``checkpoints/`` folder is left out: checkpoints go up through
    ``CheckpointManager`` under ``<output>/checkpoints/``."""
    settings = settings_from_spec(spec)
    upload_folder(output_dir, output_uri, client=make_client(settings), exclude=("checkpoints",))


def checkpoint_callback(
    output_uri: str, local_checkpoints: str | Path, spec: Any = None, *, keep: int = 2
) -> Any:
    """An HF ``TrainerCallback`` that uploads checkpoints to ``<output_uri>/checkpoints/``, after fetching the
    newest complete one from S3 into ``local_checkpoints`` (HF's output_dir), so that the trainer's own
    look-up of the newest local ``checkpoint-N`` finds it and resumes.

    Args:
        output_uri (str): the run's ``s3://`` output prefix.
        local_checkpoints (str | Path): HF Trainer's ``output_dir``.
        spec: the recipe's storage section (see ``settings_from_spec``). Default: None.
        keep (int): complete checkpoints kept in S3. Default: 2.

    Returns:
        S3CheckpointCallback: add it with ``trainer.add_callback``.
    """
    from visionft.storage.hf_callback import S3CheckpointCallback, prepare_resume

    local = Path(local_checkpoints)
    local.mkdir(parents=True, exist_ok=True)
    # Staging beside the checkpoints: same filesystem, so snapshots are hard links, not copies. HF's
    # rotation only touches checkpoint-*, and upload_outputs leaves the whole folder out.
    manager = CheckpointManager(
        output_uri,
        client=make_client(settings_from_spec(spec)),
        keep=keep,
        staging_dir=local / ".visionft-staging",
    )
    prepare_resume(manager, local)
    return S3CheckpointCallback(manager)
