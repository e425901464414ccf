"""The boto3 S3 client factory, the retry policy, and the log redaction that keeps credentials out of logs.

Retries happen at two levels:

* Per request, inside botocore: "standard" retry mode retries 5xx, throttling, timeouts and dropped
  connections with exponential backoff and full jitter (at most 20 s), and fails fast on 4xx such as
  NoSuchBucket or AccessDenied. ``StorageSettings.max_attempts`` bounds it.
* Per file, in ``sync``: a body that breaks off mid-stream cannot be retried by botocore (the request already
  succeeded), so ``retry_call`` restarts it, and the download resumes from the bytes it already has.

botocore's DEBUG records hold request headers: the access key id in ``Authorization``, the session token in
``X-Amz-Security-Token`` and the canonical request. ``make_client`` installs a log record factory that scrubs
those, and the literal credential values it resolved, from every record of the boto3, botocore, s3transfer
and urllib3 loggers, so DEBUG logging stays usable and safe.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
from botocore.config import Config

from visionft.storage.errors import StorageError, classify
from visionft.storage.settings import StorageSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Logger name prefixes whose records are scrubbed of credentials.
WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "visionft.storage")

_REDACTED = "<redacted>"
_HEADER_PATTERNS = [
    re.compile(r"(Credential=)[^/\s,'\"]+", re.IGNORECASE),
    re.compile(r"(Signature=)[0-9a-fA-F]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Credential=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Signature=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.IGNORECASE),
]


class _Redactor:
    """Scrubs credentials from log records; installed once as a wrapper of the log record factory."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._installed = False

    def add(self, *values: str | None) -> None:
        with self._lock:
            # Very short values would redact ordinary words; real keys are 16+ characters.
            self._secrets.update(v for v in values if v and len(v) >= 8)

    def scrub(self, text: str) -> str:
        for pattern in _HEADER_PATTERNS:
            text = pattern.sub(r"\1" + _REDACTED, text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                if record.name.startswith(WIRE_LOGGERS):
                    try:
                        message = record.getMessage()
                    except Exception:  # a broken format string is the logger's problem, not ours
                        return record
                    record.msg, record.args = self.scrub(message), None
                return record

            logging.setLogRecordFactory(factory)
            self._installed = True


_redactor = _Redactor()


def scrub(text: str) -> str:
    """Remove the credentials known to this process (and signed header values) from ``text``."""
    return _redactor.scrub(text)


def make_client(
    settings: StorageSettings | None = None,
    *,
    session: boto3.session.Session | None = None,
    max_pool_connections: int = 32,
) -> Any:
    """Create an S3 client for the settings, with credentials from the environment or the AWS chain.

    Args:
        settings (StorageSettings | None): endpoint, region, addressing and TLS; from the environment when
            None. Default: None.
        session (boto3.session.Session | None): a session to take credentials from; a fresh default
            session (the AWS chain) when None. Default: None.
        max_pool_connections (int): HTTP connections kept open; set it at least to the transfer
            concurrency so that threads do not queue for a connection. Default: 32.

    Returns:
        botocore.client.S3: the client. It is thread-safe; share one per process.
    """
    settings = settings or StorageSettings.from_env()
    session = session or boto3.session.Session()
    _redactor.install()
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        _redactor.add(frozen.access_key, frozen.secret_key, frozen.token)
    config = Config(
        region_name=settings.region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.path_style else "auto"},
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max_pool_connections,
        user_agent_extra="visionft",
        # Only compute checksums where S3 requires them: several S3-compatible servers reject the newer
        # default trailing checksums on multipart uploads.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    verify: bool | str = settings.verify_tls
    if settings.verify_tls and settings.ca_bundle:
        verify = settings.ca_bundle
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config, verify=verify)


def endpoint_of(client: Any) -> str:
    """The endpoint URL a client talks to (for messages)."""
    return str(client.meta.endpoint_url)


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Seconds to sleep before retry number ``attempt`` (1-based): exponential with full jitter.

    Full jitter (a uniform draw up to the exponential bound) spreads the retries of many pods that failed
    at the same moment, so they do not hammer a recovering server in lockstep.
    """
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def retry_call(
    fn: Callable[[], T],
    *,
    uri: str,
    endpoint: str | None,
    attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``, retrying transient faults with backoff; permanent ones are raised at once.

    Args:
        fn (Callable[[], T]): the operation; it must be safe to repeat (idempotent or resumable).
        uri (str): named in the error.
        endpoint (str | None): named in the error.
        attempts (int): calls in total. Default: 3.
        sleep (Callable[[float], None]): for tests. Default: time.sleep.

    Returns:
        T: what ``fn`` returned.

    Raises:
        StorageError: the classified error of the last attempt.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            error = classify(exc, uri, endpoint)
            if not error.transient or attempt == attempts:
                if error is exc:
                    raise
                raise error from exc
            delay = backoff_delay(attempt)
            logger.warning("%s; retrying in %.1f s (attempt %d of %d)", error, delay, attempt + 1, attempts)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def wrap_errors(uri: str, endpoint: str | None, exc: BaseException) -> StorageError:
    """Classify ``exc`` for ``uri`` (shorthand for ``raise wrap_errors(...) from exc``)."""
    return exc if isinstance(exc, StorageError) else classify(exc, uri, endpoint)
