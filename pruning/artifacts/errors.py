"""Artifact-store errors: the :class:`StoreError` family and retry classification.

Every store error is a :class:`~pruning.errors.UserError` with a one-line, secret-free message;
:func:`is_transient_store_error` tells retry logic (e.g. a Prefect ``retry_condition_fn``)
which of them are worth retrying.
"""

from __future__ import annotations

from typing import Any

from pruning.errors import UserError

__all__ = [
    "BucketNotFound",
    "ChecksumMismatch",
    "KeyNotFound",
    "StoreAuthError",
    "StoreError",
    "StoreServerError",
    "StoreUnreachable",
    "is_transient_store_error",
]

class StoreError(UserError):
    """Base class of all artifact-store errors; the message is one line, secret-free."""

    def __init__(self, message: str) -> None:
        # Enforce the one-line rule even when a server sends a multi-line message.
        super().__init__(" ".join(str(message).split()))


class StoreUnreachable(StoreError):
    """The storage endpoint cannot be reached (refused, DNS, timeout). Transient."""


class StoreServerError(StoreError):
    """The server answered with a 5xx / throttling error. Transient."""


class StoreAuthError(StoreError):
    """Credentials missing, wrong, or without permission. Not transient."""


class BucketNotFound(StoreError):
    """The S3 bucket does not exist (and ``create_bucket`` was not requested)."""


class ChecksumMismatch(StoreError):
    """Stored bytes do not match their sidecar or the expected sha256."""


class KeyNotFound(StoreError):
    """The requested key does not exist in the store."""


_TRANSIENT_STORE_ERRORS = (StoreUnreachable, StoreServerError)
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "503",
        "500",
        "502",
        "504",
    }
)
_AUTH_S3_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "AllAccessDisabled",
        "AccountProblem",
        "403",
        "401",
    }
)


def is_transient_store_error(exc: BaseException) -> bool:
    """True if retrying might help: unreachable endpoint, timeouts, 5xx, throttling.

    False for auth errors, missing buckets/keys, checksum mismatches and anything
    unrelated to storage.  Walks ``__cause__``/``__context__`` so a wrapped store
    error is still classified.  Meant for Prefect ``retry_condition_fn``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        verdict = _classify_one(cur)
        if verdict is not None:
            return verdict
        cur = cur.__cause__ or cur.__context__
    return False


def _classify_one(exc: BaseException) -> bool | None:
    """True/False when ``exc`` itself decides transience, None to look at its cause."""
    if isinstance(exc, _TRANSIENT_STORE_ERRORS):
        return True
    if isinstance(exc, StoreError):
        return False
    try:  # botocore is a hard dependency, but keep the classifier import-safe.
        from botocore import exceptions as bce
    except ImportError:  # pragma: no cover
        bce = None
    if bce is not None:
        if isinstance(
            exc,
            (
                bce.EndpointConnectionError,
                bce.ConnectTimeoutError,
                bce.ReadTimeoutError,
                bce.ConnectionClosedError,
                bce.ResponseStreamingError,
                bce.IncompleteReadError,
            ),
        ) and not isinstance(exc, bce.SSLError):
            return True
        if isinstance(exc, bce.ClientError):
            code, status = _client_error_code(exc)
            return code in _TRANSIENT_S3_CODES or (status is not None and status >= 500)
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.SSLError)):
            return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return None



def _client_error_code(exc: Any) -> tuple[str, int | None]:
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code") or "")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status
