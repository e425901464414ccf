"""Object storage for the trainer: S3 URIs, settings, resumable sync, atomic publish and checkpoints.

torch-free and transformers-free (only ``hf_callback`` imports transformers, when a checkpoint callback is
made). ``sync_down``, ``upload_outputs`` and ``checkpoint_callback`` are the calls ``visionft.job.run`` makes.
Typical use::

    from visionft.storage import StorageSettings, make_client, download_prefix, upload_folder

    client = make_client(StorageSettings.from_env())
    download_prefix("s3://datasets/latex-ocr/", "/data/latex-ocr", client=client)
    upload_folder("/out/lora", "s3://outputs/team-a/latex-ocr/lora/", client=client)
"""

from visionft.storage.checkpoints import CheckpointInfo, CheckpointManager
from visionft.storage.client import make_client
from visionft.storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    IncompleteUploadError,
    IntegrityError,
    MissingCredentialsError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnreachableHostError,
    WrongEndpointError,
)
from visionft.storage.manifest import MANIFEST_NAME, Manifest
from visionft.storage.settings import StorageSettings
from visionft.storage.sync import (
    SyncProgress,
    SyncResult,
    delete_prefix,
    download_prefix,
    read_bytes,
    read_manifest,
    upload_folder,
    verify_prefix,
)
from visionft.storage.trainer_io import checkpoint_callback, settings_from_spec, sync_down, upload_outputs
from visionft.storage.uri import StorageURI, parse_uri

__all__ = [
    "MANIFEST_NAME",
    "AccessDeniedError",
    "BucketNotFoundError",
    "CheckpointInfo",
    "CheckpointManager",
    "IncompleteUploadError",
    "IntegrityError",
    "Manifest",
    "MissingCredentialsError",
    "ObjectNotFoundError",
    "StorageError",
    "StorageSettings",
    "StorageURI",
    "SyncProgress",
    "SyncResult",
    "TransientStorageError",
    "UnreachableHostError",
    "WrongEndpointError",
    "checkpoint_callback",
    "delete_prefix",
    "download_prefix",
    "make_client",
    "parse_uri",
    "read_bytes",
    "read_manifest",
    "settings_from_spec",
    "sync_down",
    "upload_folder",
    "upload_outputs",
    "verify_prefix",
]
