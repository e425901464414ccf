"""Storage errors: one class per cause a user can fix, each message naming the URI and the likely fix.

``classify()`` turns a botocore exception into one of these. Messages never hold credentials: they are built
from the URI, the endpoint and the S3 error code only, never from request headers or the signing context.
"""

from __future__ import annotations

import re

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.parsers import ResponseParserError
from urllib3.exceptions import NameResolutionError, ProtocolError


class StorageError(Exception):
    """Base of all storage errors.

    Args:
        uri (str): the object or prefix the operation was about, e.g. ``s3://datasets/latex-ocr/``.
        message (str): what went wrong and the likely fix.
    """

    #: Whether retrying the same request later may succeed (5xx, throttling, a dropped connection).
    transient = False

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri


class BucketNotFoundError(StorageError):
    """The bucket does not exist at this endpoint."""


class ObjectNotFoundError(StorageError):
    """The object does not exist (the bucket does)."""


class AccessDeniedError(StorageError):
    """The endpoint refused the credentials or the credentials lack a permission."""


class MissingCredentialsError(AccessDeniedError):
    """No credentials were found in the environment or the AWS credential chain."""


class WrongEndpointError(StorageError):
    """Something answered at the endpoint, or nothing listens on its port, but it is not an S3 server."""


class UnreachableHostError(StorageError):
    """The endpoint's host name does not resolve, or the host does not answer in time."""


class TransientStorageError(StorageError):
    """A fault that may pass (5xx, throttling, timeout, connection reset) persisted through all retries."""

    transient = True


class IncompleteUploadError(StorageError):
    """A prefix has no manifest, or its manifest does not match the objects: it was never fully published."""


class IntegrityError(StorageError):
    """A downloaded file does not match its manifest (size or sha256) or its listing (size or ETag)."""


# S3 error codes, grouped by the class they map to.
_NO_BUCKET = {"NoSuchBucket"}
_NO_KEY = {"NoSuchKey", "NotFound", "404"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "403",
}
_THROTTLED = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "TooManyRequests",
}

_FIX_ENDPOINT = (
    "check storage.endpoint (scheme, host and port) points at the S3 API, e.g. http://minio.storage.svc:9000 "
    "(for MinIO the API port, not the console port)"
)


def classify(exc: BaseException, uri: str, endpoint: str | None) -> StorageError:
    """Map a botocore or connection exception to the StorageError a user can act on.

    Args:
        exc (BaseException): what boto3 raised.
        uri (str): the URI of the operation, named in the message.
        endpoint (str | None): the endpoint URL in use (None: AWS's default for the region).

    Returns:
        StorageError: the matching subclass; an already classified StorageError is returned unchanged.
    """
    if isinstance(exc, StorageError):
        return exc
    where = endpoint or "the AWS default endpoint"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return MissingCredentialsError(
            uri,
            "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on the cluster: the "
            "keys of the Secret named in spec.storage.credentialsSecret) or configure the AWS credential chain",
        )
    if isinstance(exc, ClientError):
        return _classify_client_error(exc, uri, where)
    if isinstance(exc, ResponseParserError):
        return WrongEndpointError(
            uri, f"the server at {where} answered, but not with an S3 response; {_FIX_ENDPOINT}"
        )
    if isinstance(exc, EndpointConnectionError):
        cause = exc.kwargs.get("error")
        if isinstance(cause, NameResolutionError) or "Name or service not known" in str(cause):
            return UnreachableHostError(
                uri,
                f"the host of {where} does not resolve; check the host name in storage.endpoint, and the "
                "pod's DNS and network policy",
            )
        if "Connection refused" in str(cause):
            return WrongEndpointError(
                uri, f"nothing listens at {where} (connection refused); {_FIX_ENDPOINT}, and that it is up"
            )
        return UnreachableHostError(
            uri, f"cannot connect to {where}; check the endpoint's host, firewall and network policy"
        )
    if isinstance(exc, ConnectTimeoutError):
        return UnreachableHostError(
            uri,
            f"{where} did not accept a connection in time; check the host in storage.endpoint, firewalls and "
            "network policies (egress from the pod)",
        )
    if isinstance(
        exc,
        ReadTimeoutError
        | ConnectionClosedError
        | IncompleteReadError
        | ResponseStreamingError
        | ProtocolError
        | ConnectionError
        | TimeoutError,
    ):
        return TransientStorageError(
            uri, f"the connection to {where} failed mid-transfer ({type(exc).__name__}); retries ran out"
        )
    return StorageError(uri, f"unexpected error from {where}: {type(exc).__name__}")


def _classify_client_error(exc: ClientError, uri: str, where: str) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    meta = exc.response.get("ResponseMetadata", {})
    status = int(meta.get("HTTPStatusCode") or 0)
    content_type = str(meta.get("HTTPHeaders", {}).get("content-type", ""))
    # An S3 server answers errors in XML (HEAD requests have no body at all). A bare numeric code with a
    # JSON or HTML body means some other HTTP service holds the port.
    not_s3 = code.isdigit() and content_type and "xml" not in content_type
    if not_s3:
        return WrongEndpointError(
            uri, f"the server at {where} answered HTTP {status} with {content_type}, not S3; {_FIX_ENDPOINT}"
        )
    if code in _NO_BUCKET:
        bucket = error.get("BucketName") or _bucket_of(uri)
        return BucketNotFoundError(
            uri,
            f"bucket {bucket!r} does not exist at {where}; create it, or fix the bucket name or the "
            "endpoint/region in the storage settings",
        )
    if code in _DENIED:
        hint = {
            "InvalidAccessKeyId": "the access key id is unknown to this server",
            "SignatureDoesNotMatch": "the secret access key does not match the access key id",
            "ExpiredToken": "the session token has expired",
        }.get(code, "the credentials lack a permission for this operation")
        return AccessDeniedError(
            uri,
            f"access denied by {where} ({code}: {hint}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (the "
            "Secret in spec.storage.credentialsSecret) and the bucket policy",
        )
    if code in _NO_KEY:
        return ObjectNotFoundError(uri, f"no such object at {where}; check the key or prefix")
    if code == "PermanentRedirect" or code == "AuthorizationHeaderMalformed":
        return WrongEndpointError(
            uri, f"the bucket lives in another region or endpoint ({code}); set storage.region to its region"
        )
    if code in _THROTTLED or status >= 500:
        return TransientStorageError(
            uri, f"{where} kept failing with {code or status} through all retries; try again later"
        )
    return StorageError(uri, f"{where} refused the request ({code or status}: {error.get('Message', '')})")


_BUCKET_RE = re.compile(r"^s3://([^/]+)")


def _bucket_of(uri: str) -> str:
    match = _BUCKET_RE.match(uri)
    return match.group(1) if match else uri
