"""S3-compatible artifact store (AWS S3, MinIO, SeaweedFS, ...) via boto3."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pruning.artifacts.base import _CHUNK, ArtifactStore, register_store, validate_key
from pruning.artifacts.errors import (
    _AUTH_S3_CODES,
    _TRANSIENT_S3_CODES,
    BucketNotFound,
    KeyNotFound,
    StoreAuthError,
    StoreError,
    StoreServerError,
    StoreUnreachable,
    _client_error_code,
)
from pruning.redact import redact_url as _redact_url

__all__ = ["S3Store"]


def _env_first(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _connection_reason(exc: BaseException) -> str:
    text = str(getattr(exc, "kwargs", {}).get("error", "") or exc).lower()
    for needle, reason in (
        ("refused", "connection refused"),
        ("name or service not known", "host name not resolved"),
        ("nodename nor servname", "host name not resolved"),
        ("temporary failure in name resolution", "host name not resolved"),
        ("failed to resolve", "host name not resolved"),
        ("network is unreachable", "network unreachable"),
        ("no route to host", "no route to host"),
        ("timed out", "connection timed out"),
        ("reset by peer", "connection reset"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__


@register_store("s3")
class S3Store(ArtifactStore):
    """Artifacts under ``s3://bucket/prefix`` via boto3 (AWS S3, MinIO, SeaweedFS, ...).

    Endpoint: ``endpoint_url`` option, else env ``AGENTIC_PRUNER_S3_ENDPOINT``,
    ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else AWS.  Region and credentials
    come from the standard AWS env vars / profile unless passed explicitly.
    Custom endpoints default to path-style addressing.
    """

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        addressing_style: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__()
        if not bucket:
            raise ValueError("S3 store needs a bucket name (s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or _env_first(
            "AGENTIC_PRUNER_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        )
        self.region = region
        self.create_bucket = bool(create_bucket)
        self.profile = profile
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_attempts = int(max_attempts)
        self.addressing_style = addressing_style or ("path" if self.endpoint_url else "auto")
        self.multipart_threshold = int(multipart_threshold)
        # Explicit credentials live only here (never in describe()/repr/errors/pickles).
        self._explicit_creds = (aws_access_key_id, aws_secret_access_key, aws_session_token)
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._bucket_ready = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "S3Store":
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError(
                "credentials in s3:// URLs are not supported; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            )
        if parts.query or parts.fragment:
            raise ValueError("s3:// store URLs take no query string or fragment")
        return cls(parts.netloc, parts.path, **options)

    # ---- pickling (Prefect may hash/serialise task inputs): no client, no secrets
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client_obj"] = None
        state["_explicit_creds"] = (None, None, None)
        state.pop("_client_lock", None)
        state.pop("_append_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()
        self._append_lock = threading.Lock()

    # ---- client
    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    self._client_obj = self._make_client()
        return self._client_obj

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        key_id, secret, token = self._explicit_creds
        try:
            session = boto3.session.Session(
                profile_name=self.profile,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                aws_session_token=token,
                region_name=self.region,
            )
            config = Config(
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                s3={"addressing_style": self.addressing_style},
            )
            return session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except Exception as exc:  # ProfileNotFound, bad endpoint URL, ...
            raise StoreError(f"cannot configure S3 client for {self.describe()}: {type(exc).__name__}") from exc

    @property
    def _endpoint_label(self) -> str:
        ep = self.endpoint_url
        if ep is None and self._client_obj is not None:
            ep = self._client_obj.meta.endpoint_url
        return _redact_url(ep) or "AWS S3"

    # ---- naming
    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel_key(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(validate_key(key))}"

    def describe(self) -> str:
        root = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        region = self.region or _env_first("AWS_REGION", "AWS_DEFAULT_REGION") or "default region"
        creds = "explicit credentials" if self._explicit_creds[0] else (
            f"profile {self.profile}" if self.profile else "credentials from AWS env/profile"
        )
        return f"{root} at endpoint {self._endpoint_label} ({region}, {creds})"

    # ---- error mapping
    def _map_error(self, exc: BaseException, op: str, key: str | None = None) -> BaseException:
        """Translate botocore/boto3 exceptions into one-line StoreErrors."""
        from botocore import exceptions as bce

        # boto3's transfer manager wraps the real ClientError.
        inner = exc
        for _ in range(4):
            if isinstance(inner, (bce.BotoCoreError, bce.ClientError)):
                break
            nxt = inner.__cause__ or inner.__context__ or getattr(inner, "last_exception", None)
            if nxt is None:
                break
            inner = nxt
        where = f"s3://{self.bucket}/{self._full_key(key)}" if key else f"s3://{self.bucket}"
        ep = self._endpoint_label
        if isinstance(inner, bce.SSLError):
            return StoreError(f"TLS error talking to S3 endpoint {ep} during {op} of {where}")
        if isinstance(inner, bce.ConnectTimeoutError):
            return StoreUnreachable(f"cannot reach S3 endpoint {ep} (connect timeout after {self.connect_timeout:g} s)")
        if isinstance(inner, bce.ReadTimeoutError):
            return StoreUnreachable(f"S3 endpoint {ep} did not answer {op} of {where} ({self.max_attempts} attempt(s), "
                                    f"{self.read_timeout:g} s each)")
        if isinstance(inner, (bce.EndpointConnectionError, bce.ProxyConnectionError)):
            return StoreUnreachable(f"cannot reach S3 endpoint {ep} ({_connection_reason(inner)})")
        if isinstance(inner, (bce.ConnectionClosedError, bce.ResponseStreamingError, bce.IncompleteReadError)):
            return StoreUnreachable(f"connection to S3 endpoint {ep} broke during {op} of {where}")
        if isinstance(inner, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return StoreAuthError(
                f"no usable AWS credentials for {where} at {ep} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            )
        if isinstance(inner, bce.ClientError):
            code, status = _client_error_code(inner)
            if code in ("NoSuchBucket",) or (op == "head_bucket" and code in ("404", "NotFound")):
                hint = "" if self.create_bucket else "; create it or pass create_bucket=True"
                return BucketNotFound(f"bucket '{self.bucket}' does not exist at S3 endpoint {ep}{hint}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return KeyNotFound(f"key '{key}' not found at {where}")
            if code in _AUTH_S3_CODES:
                label = code if not code.isdigit() else f"HTTP {code}"
                return StoreAuthError(
                    f"S3 endpoint {ep} rejected the credentials for {where} ({label}); "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and bucket permissions"
                )
            if code in _TRANSIENT_S3_CODES or (status is not None and status >= 500):
                return StoreServerError(f"S3 endpoint {ep} failed {op} of {where} ({code or 'HTTP'} {status})")
            return StoreError(f"S3 {op} of {where} failed at {ep} ({code or 'error'}, HTTP {status})")
        if isinstance(inner, bce.BotoCoreError):
            return StoreError(f"S3 {op} of {where} failed at {ep} ({type(inner).__name__})")
        return exc

    def _call(self, op: str, key: str | None = None, **kwargs: Any) -> Any:
        from botocore import exceptions as bce

        try:
            return getattr(self._client, op)(**kwargs)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            mapped = self._map_error(exc, op, key)
            if mapped is exc:
                raise
            raise mapped from exc

    def _write(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        """Run a write; on a missing bucket with create_bucket=True create it and retry once."""
        from boto3 import exceptions as b3e
        from botocore import exceptions as bce

        for attempt in (0, 1):
            try:
                return fn()
            except (bce.BotoCoreError, bce.ClientError, b3e.Boto3Error) as exc:
                mapped = self._map_error(exc, op, key)
                if isinstance(mapped, BucketNotFound) and self.create_bucket and attempt == 0:
                    self._ensure_bucket()
                    continue
                if mapped is exc:
                    raise
                raise mapped from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- primitives
    def _raw_put(self, key: str, data: bytes) -> None:
        full = self._full_key(key)
        self._write("put_object", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def _raw_put_file(self, key: str, path: Path) -> None:
        full = self._full_key(key)
        size = path.stat().st_size
        if size < self.multipart_threshold:
            def put() -> None:
                with open(path, "rb") as fh:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=fh)
            self._write("put_object", key, put)
            return
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(self.multipart_threshold // 2, 5 * 1024 * 1024),
        )
        self._write(
            "upload_file", key, lambda: self._client.upload_file(str(path), self.bucket, full, Config=cfg)
        )

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        from botocore import exceptions as bce

        full = self._full_key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **condition)
            return True
        except bce.ClientError as exc:
            code, status = _client_error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise self._map_error(exc, "put_object", key) from exc
        except bce.BotoCoreError as exc:
            raise self._map_error(exc, "put_object", key) from exc

    def _raw_create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def _raw_get_versioned(self, key: str) -> tuple[bytes, str]:
        resp = self._call("get_object", key, Bucket=self.bucket, Key=self._full_key(key))
        return resp["Body"].read(), resp["ETag"]

    def _raw_replace_if(self, key: str, data: bytes, version: str) -> bool:
        return self._conditional_put(key, data, IfMatch=version)

    def _raw_get(self, key: str) -> bytes:
        from botocore import exceptions as bce

        resp = self._call("get_object", key, Bucket=self.bucket, Key=self._full_key(key))
        try:
            return resp["Body"].read()
        except (bce.BotoCoreError, OSError) as exc:
            mapped = self._map_error(exc, "get_object", key)
            if mapped is exc:
                raise StoreUnreachable(f"connection to S3 endpoint {self._endpoint_label} broke while reading {self.url_for(key)}") from exc
            raise mapped from exc

    def _raw_get_file(self, key: str, dest: Path) -> None:
        from botocore import exceptions as bce

        resp = self._call("get_object", key, Bucket=self.bucket, Key=self._full_key(key))
        try:
            with open(dest, "wb") as fh:
                for chunk in resp["Body"].iter_chunks(_CHUNK):
                    fh.write(chunk)
        except bce.BotoCoreError as exc:
            raise self._map_error(exc, "get_object", key) from exc

    def _raw_exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=self._full_key(key))
            return True
        except KeyNotFound:
            return False

    def _raw_delete(self, key: str) -> None:
        try:
            self._call("delete_object", key, Bucket=self.bucket, Key=self._full_key(key))
        except KeyNotFound:
            return

    def _raw_list(self, prefix: str) -> list[str]:
        from botocore import exceptions as bce

        full_prefix = self._full_key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", ()):
                    out.append(self._rel_key(obj["Key"]))
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._map_error(exc, "list_objects_v2") from exc
        return sorted(out)

    # ---- bucket + check
    def _ensure_bucket(self) -> None:
        """Make sure the bucket exists; create it only if ``create_bucket`` is set."""
        if self._bucket_ready:
            return
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except BucketNotFound:
            if not self.create_bucket:
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            region = self._client.meta.region_name
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._call("create_bucket", **kwargs)
            except StoreError as exc:
                code = exc.__cause__ and _client_error_code(exc.__cause__)[0]
                if code not in ("BucketAlreadyOwnedByYou",):
                    raise
        except StoreAuthError:
            # HEAD responses carry no error code; ask again with a GET to get a precise one.
            self._call("list_objects_v2", Bucket=self.bucket, MaxKeys=1)
            raise
        self._bucket_ready = True

    def check(self) -> None:
        self._ensure_bucket()
        self._probe()
