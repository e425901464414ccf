"""Where and how to reach S3: endpoint, region, addressing style and TLS. Never credentials.

Credentials deliberately have no field here. boto3 reads them from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, which the operator maps from the
user's Secret) or the rest of the AWS chain (profile, web identity, instance metadata). So a settings object
can be printed, logged and saved in the trainer's config without ever holding a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean; use true or false")


@dataclass(frozen=True)
class StorageSettings:
    """How to reach the object store.

    Args:
        endpoint_url (str | None): the S3 API URL, e.g. ``http://minio.storage.svc:9000``; None for AWS.
            Default: None.
        region (str | None): the region to sign for; None lets boto3 decide (us-east-1 for most
            S3-compatible servers). Default: None.
        path_style (bool): address buckets as ``endpoint/bucket/key`` instead of ``bucket.endpoint/key``.
            MinIO, Ceph RGW and SeaweedFS need it unless they have wildcard DNS. Default: True when an
            endpoint is set, else False (see ``from_env``).
        verify_tls (bool): check the server's TLS certificate. Turn off only for a test endpoint.
            Default: True.
        ca_bundle (str | None): a PEM file of CA certificates to trust instead of the system ones (for a
            private CA). Ignored when verify_tls is False. Default: None.
        max_attempts (int): attempts per request, the first included, for transient faults. Default: 5.
        connect_timeout (float): seconds to wait for a TCP/TLS connection. Default: 5.
        read_timeout (float): seconds to wait for a response or the next bytes of a body. Default: 60.
    """

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    verify_tls: bool = True
    ca_bundle: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(
                f"storage endpoint_url={self.endpoint_url!r} must start with http:// or https://, "
                "e.g. http://minio.storage.svc:9000"
            )
        if self.endpoint_url and "@" in self.endpoint_url.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "storage endpoint_url holds user credentials; remove them: credentials come from "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS credential chain"
            )
        if self.max_attempts < 1:
            raise ValueError(f"storage max_attempts={self.max_attempts} must be at least 1")
        if self.ca_bundle is not None and not os.path.isfile(self.ca_bundle):
            raise ValueError(f"storage ca_bundle={self.ca_bundle!r} is not a file; give a PEM file path")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> StorageSettings:
        """Read settings from the environment, as the trainer pod gets them.

        Variables: ``VISIONFT_S3_ENDPOINT`` (else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``),
        ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``), ``VISIONFT_S3_PATH_STYLE`` (default: true when an
        endpoint is set), ``VISIONFT_S3_VERIFY_TLS`` (default true) and ``AWS_CA_BUNDLE``.

        Args:
            env (Mapping[str, str] | None): the environment; ``os.environ`` when None. Default: None.
            **overrides: field values that win over the environment (None values are ignored).

        Returns:
            StorageSettings: the settings.
        """
        env = os.environ if env is None else env
        endpoint = (
            env.get("VISIONFT_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        )
        values: dict[str, Any] = {
            "endpoint_url": endpoint or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            "path_style": _env_bool(env, "VISIONFT_S3_PATH_STYLE", default=bool(endpoint)),
            "verify_tls": _env_bool(env, "VISIONFT_S3_VERIFY_TLS", default=True),
            "ca_bundle": env.get("AWS_CA_BUNDLE") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, safe to save in a config or log (there are no secrets in it)."""
        return asdict(self)
