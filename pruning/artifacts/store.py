"""Artifact store: one small interface, two backends (local directory, S3).

Every checkpoint, report and decision of a pruning run is written through an
:class:`ArtifactStore`.  Keys are POSIX-style relative strings such as
``runs/<run_id>/history.jsonl``.  Backends are picked from a URL::

    store = open_store("runs-store")                    # LocalStore (a directory)
    store = open_store("file:///data/pruner")           # LocalStore
    store = open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:8333")
    store.check()                                       # fail fast, one-line error

Integrity: every ``put_*`` also writes a sidecar ``<key>.sha256`` (``sha256sum``
format), and every ``get_*`` verifies the bytes against the sidecar when it is
present and against an explicit ``sha256=`` argument when given; a mismatch
raises :class:`ChecksumMismatch`.  Writes are atomic (temp file + ``os.replace``
locally, a single PUT / completed multipart upload on S3).  A key and its
sidecar are two objects, so a crash between the two writes is reported as a
checksum mismatch on the next read, never silently accepted.

Concurrency: one writer per key.  ``append_jsonl`` is a read-modify-write,
serialised within one store object (thread lock) but not across processes.

Errors are :class:`StoreError` subclasses with one-line messages that never
contain secrets; :func:`is_transient_store_error` tells retry logic (e.g. a
Prefect ``retry_condition_fn``) which of them are worth retrying.

This module deliberately has no Prefect imports.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, Field

from pruning.errors import UserError

__all__ = [
    "ArtifactStore",
    "BucketNotFound",
    "ChecksumMismatch",
    "KeyNotFound",
    "LocalStore",
    "S3Store",
    "StoreAuthError",
    "StoreConfig",
    "StoreError",
    "StoreServerError",
    "StoreUnreachable",
    "SIDECAR_SUFFIX",
    "available_schemes",
    "is_transient_store_error",
    "open_store",
    "register_store",
    "sha256_hex",
]

SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- helpers


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalize_expected(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if not _HEX64.match(s):
        raise ValueError(f"expected a 64-character hex sha256, got {sha256!r}")
    return s


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid POSIX relative key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"store key must be a relative POSIX path, got {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"store key has an empty, '.' or '..' segment: {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    if prefix == "":
        return prefix
    if not isinstance(prefix, str) or prefix.startswith("/") or "\\" in prefix:
        raise ValueError(f"store prefix must be a relative POSIX string, got {prefix!r}")
    if any(p in (".", "..") for p in prefix.split("/")[:-1]):
        raise ValueError(f"store prefix has a '.' or '..' segment: {prefix!r}")
    return prefix


def _sidecar_text(digest: str, key: str) -> bytes:
    # sha256sum format, so `sha256sum -c <key>.sha256` works inside a local store.
    return f"{digest}  {key.rsplit('/', 1)[-1]}\n".encode()


def _parse_sidecar(raw: bytes, key: str) -> str:
    token = raw.decode("ascii", errors="replace").strip().split(maxsplit=1)
    digest = token[0].lower() if token else ""
    if not _HEX64.match(digest):
        raise ChecksumMismatch(f"checksum sidecar for key '{key}' is malformed")
    return digest


def _drop_sidecars(keys: list[str]) -> list[str]:
    """Hide ``<key>.sha256`` entries whose ``<key>`` is also listed."""
    present = set(keys)
    return sorted(
        k
        for k in keys
        if not (k.endswith(SIDECAR_SUFFIX) and k[: -len(SIDECAR_SUFFIX)] in present)
    )


def _redact_url(url: str | None) -> str | None:
    """Drop any ``user:password@`` part of a URL (never show credentials)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _env_first(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


# --------------------------------------------------------------------------- registry

_STORE_REGISTRY: dict[str, type["ArtifactStore"]] = {}
_S = TypeVar("_S", bound=type["ArtifactStore"])


def register_store(*schemes: str) -> Callable[[_S], _S]:
    """Class decorator registering an :class:`ArtifactStore` for URL ``schemes``.

    ``""`` stands for a plain filesystem path.  The class must implement
    ``from_url(url, **options)``.
    """

    def deco(cls: _S) -> _S:
        for scheme in schemes:
            s = scheme.lower()
            if s in _STORE_REGISTRY and _STORE_REGISTRY[s] is not cls:
                raise ValueError(f"store scheme {scheme!r} already registered to {_STORE_REGISTRY[s].__name__}")
            _STORE_REGISTRY[s] = cls
        return cls

    return deco


def available_schemes() -> list[str]:
    """URL schemes with a registered backend (``""`` = plain path)."""
    return sorted(_STORE_REGISTRY)


def _scheme_of(url: str) -> str:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return m.group(1).lower() if m else ""


def open_store(url: str | os.PathLike[str], **options: Any) -> "ArtifactStore":
    """Open the backend for ``url``: a path or ``file://PATH`` → LocalStore, ``s3://bucket/prefix`` → S3Store.

    ``options`` go to the backend (S3: ``endpoint_url``, ``region``, ``create_bucket``,
    ``connect_timeout``, ``read_timeout``, ``max_attempts``, ...).  Nothing is
    contacted here; call :meth:`ArtifactStore.check` to fail fast.
    """
    url = os.fspath(url)
    if not url:
        raise ValueError("store URL is empty")
    scheme = _scheme_of(url)
    cls = _STORE_REGISTRY.get(scheme)
    if cls is None:
        known = ", ".join(f"{s}://" if s else "<path>" for s in available_schemes())
        raise ValueError(f"unsupported store URL scheme {scheme!r} (known: {known})")
    return cls.from_url(url, **options)


class StoreConfig(BaseModel):
    """Where run artifacts live.  Credentials are deliberately NOT part of it: they
    come from the standard AWS env vars / profile so they never end up in configs,
    logs or persisted run metadata."""

    url: str = Field(
        default="runs",
        description="Store location: a local directory, file://PATH, or s3://bucket/prefix. "
        "A URL (not separate fields) so one CLI flag / env var selects the backend.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for MinIO/SeaweedFS/etc.; None falls back to "
        "AGENTIC_PRUNER_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then AWS itself.",
    )
    region: str | None = Field(
        default=None,
        description="S3 region; None uses AWS_REGION / AWS_DEFAULT_REGION / the profile. "
        "Matters for SigV4 signing on AWS; S3-compatible servers mostly ignore it.",
    )
    create_bucket: bool = Field(
        default=False,
        description="Create a missing bucket instead of failing with BucketNotFound. Off by "
        "default so a typo in the bucket name fails loudly instead of scattering data.",
    )

    def open(self, **options: Any) -> "ArtifactStore":
        """Open the configured store (extra ``options`` go to the backend)."""
        opts: dict[str, Any] = {"create_bucket": self.create_bucket}
        if self.endpoint_url is not None:
            opts["endpoint_url"] = self.endpoint_url
        if self.region is not None:
            opts["region"] = self.region
        opts.update(options)
        return open_store(self.url, **opts)


# --------------------------------------------------------------------------- interface


class ArtifactStore(abc.ABC):
    """Abstract key → bytes store with checksummed, atomic writes.

    Backends implement the ``_raw_*`` primitives plus ``list``/``url_for``/
    ``describe``/``check``; checksum sidecars and the convenience methods live here.
    """

    scheme: ClassVar[str] = ""

    def __init__(self) -> None:
        self._append_lock = threading.Lock()

    # ---- construction
    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> "ArtifactStore":
        """Build the backend from its URL (used by :func:`open_store`)."""

    # ---- backend primitives (no checksums, no key validation)
    @abc.abstractmethod
    def _raw_put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _raw_get(self, key: str) -> bytes:
        """Return the bytes or raise KeyNotFound."""

    @abc.abstractmethod
    def _raw_exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _raw_delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def _raw_list(self, prefix: str) -> list[str]:
        """All keys (sidecars included) starting with ``prefix``."""

    @abc.abstractmethod
    def _raw_put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def _raw_get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` into ``dest`` (a temp path next to the final one)."""

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """Human-readable location of ``key`` (a file path or s3://bucket/key)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One-line description of the store for logs; never contains secrets."""

    @abc.abstractmethod
    def check(self) -> None:
        """Verify the store is reachable and writable (probe write+read+delete).

        Raises a :class:`StoreError` subclass with a one-line message.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # ---- core API
    def put_bytes(self, key: str, data: bytes) -> str:
        """Atomically store ``data`` under ``key`` (+ sidecar); return its sha256 hex."""
        validate_key(key)
        data = bytes(data)
        digest = sha256_hex(data)
        self._raw_put(key, data)
        self._raw_put(key + SIDECAR_SUFFIX, _sidecar_text(digest, key))
        return digest

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """Return the bytes under ``key``, verified against the sidecar (when present)
        and against ``sha256`` (when given); raises KeyNotFound / ChecksumMismatch."""
        validate_key(key)
        expected = _normalize_expected(sha256)
        data = self._raw_get(key)
        self._verify(key, sha256_hex(data), expected)
        return data

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        return self._raw_exists(validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (plain string prefix, like S3).

        Checksum sidecars of listed keys are hidden.
        """
        return _drop_sidecars(self._raw_list(_validate_prefix(prefix)))

    def delete(self, key: str) -> None:
        """Delete ``key`` and its sidecar; deleting a missing key is a no-op."""
        validate_key(key)
        self._raw_delete(key)
        self._raw_delete(key + SIDECAR_SUFFIX)

    def stored_sha256(self, key: str) -> str | None:
        """The sha256 recorded in ``key``'s sidecar, or None if there is no sidecar."""
        validate_key(key)
        try:
            raw = self._raw_get(key + SIDECAR_SUFFIX)
        except KeyNotFound:
            return None
        return _parse_sidecar(raw, key)

    def _verify(self, key: str, actual: str, expected: str | None) -> None:
        if expected is not None and actual != expected:
            raise ChecksumMismatch(
                f"checksum mismatch for key '{key}' at {self.url_for(key)}: "
                f"expected sha256 {expected[:12]}…, got {actual[:12]}…"
            )
        recorded = self.stored_sha256(key)
        if recorded is not None and recorded != actual:
            raise ChecksumMismatch(
                f"checksum mismatch for key '{key}' at {self.url_for(key)}: "
                f"sidecar says sha256 {recorded[:12]}…, content is {actual[:12]}… (corrupted or partially written)"
            )

    # ---- convenience
    def put_json(self, key: str, obj: Any, *, indent: int | None = 2) -> str:
        """Store ``obj`` as UTF-8 JSON; return sha256."""
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        return self.put_bytes(key, (text + "\n").encode("utf-8"))

    def get_json(self, key: str, sha256: str | None = None) -> Any:
        """Load JSON stored under ``key`` (checksum-verified)."""
        return json.loads(self.get_bytes(key, sha256).decode("utf-8"))

    def append_jsonl(self, key: str, record: dict[str, Any]) -> str:
        """Append one JSON line to ``key`` (read-modify-write, atomic replace); return sha256.

        Serialised per store object; not safe against concurrent writers in other
        processes (one writer per key).
        """
        line = json.dumps(record, ensure_ascii=False)
        if "\n" in line:  # json.dumps never emits raw newlines; keep the invariant explicit
            raise ValueError("JSONL record serialised to more than one line")
        with self._append_lock:
            try:
                old = self.get_bytes(key)
            except KeyNotFound:
                old = b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            return self.put_bytes(key, old + line.encode("utf-8") + b"\n")

    def read_jsonl(self, key: str, sha256: str | None = None) -> list[dict[str, Any]]:
        """All records of a JSONL object (blank lines skipped)."""
        text = self.get_bytes(key, sha256).decode("utf-8")
        out = []
        for n, ln in enumerate(text.splitlines(), 1):
            if ln.strip():
                try:
                    out.append(json.loads(ln))
                except json.JSONDecodeError as exc:
                    raise StoreError(f"key '{key}' line {n} is not valid JSON ({exc.msg})") from exc
        return out

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        """Upload the local file ``path`` to ``key`` (+ sidecar); return sha256."""
        validate_key(key)
        src = Path(path)
        digest = _file_sha256(src)
        self._raw_put_file(key, src)
        self._raw_put(key + SIDECAR_SUFFIX, _sidecar_text(digest, key))
        return digest

    def get_file(self, key: str, path: str | os.PathLike[str], sha256: str | None = None) -> Path:
        """Download ``key`` to ``path`` atomically, verifying checksums first; return the path."""
        validate_key(key)
        expected = _normalize_expected(sha256)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self._raw_get_file(key, tmp)
            self._verify(key, _file_sha256(tmp), expected)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def put_torch(self, key: str, obj: Any) -> str:
        """``torch.save`` ``obj`` (e.g. a state dict) under ``key``; return sha256."""
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        return self.put_bytes(key, buf.getvalue())

    def get_torch(self, key: str, sha256: str | None = None, *, map_location: Any = "cpu") -> Any:
        """Load a torch object with ``weights_only=True`` (always; arbitrary pickles are refused)."""
        import torch

        data = self.get_bytes(key, sha256)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def _probe_key(self) -> str:
        return f".store-check/{uuid.uuid4().hex}"

    def _probe(self) -> None:
        """Write, read back and delete a small probe object."""
        key = self._probe_key()
        payload = f"agentic-pruner store probe {uuid.uuid4().hex}".encode()
        self._raw_put(key, payload)
        try:
            back = self._raw_get(key)
        finally:
            self._raw_delete(key)
        if back != payload:
            raise ChecksumMismatch(f"store {self.describe()} returned different bytes for its probe object")


# --------------------------------------------------------------------------- local backend


def _current_umask() -> int:
    # Read it without os.umask(), which would briefly change it for every thread.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_FILE_MODE = 0o666 & ~_current_umask()


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


@register_store("", "file")
class LocalStore(ArtifactStore):
    """Artifacts in a local directory; writes go to a temp file + ``os.replace``."""

    scheme = "file"
    _IGNORED_OPTIONS = ("endpoint_url", "region", "create_bucket")

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.fsync = fsync

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "LocalStore":
        """``PATH`` or ``file://PATH``; S3-only options (endpoint_url, region, create_bucket) are ignored."""
        for name in cls._IGNORED_OPTIONS:
            options.pop(name, None)
        if _scheme_of(url) == "file":
            # file:///abs/path and file://localhost/abs/path; file://rel/path is tolerated as relative.
            path = unquote(url[len("file://") :])
            if path.startswith("localhost/"):
                path = path[len("localhost") :]
        else:
            path = url
        if not path:
            raise ValueError(f"store URL {url!r} has no path")
        return cls(path, **options)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_append_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._append_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def url_for(self, key: str) -> str:
        return str(self._path(validate_key(key)))

    def describe(self) -> str:
        return f"local store at {self.root}"

    def _oserror(self, exc: OSError, what: str) -> StoreError:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, PermissionError):
            return StoreAuthError(f"permission denied to {what} in local store {self.root} ({reason})")
        return StoreError(f"cannot {what} in local store {self.root} ({reason})")

    def _write_atomic(self, dest: Path, writer: Callable[[Any], None]) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        except OSError as exc:
            raise self._oserror(exc, f"write '{dest.relative_to(self.root).as_posix()}'") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                writer(fh)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dest)
        except OSError as exc:
            raise self._oserror(exc, f"write '{dest.relative_to(self.root).as_posix()}'") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _raw_put(self, key: str, data: bytes) -> None:
        self._write_atomic(self._path(key), lambda fh: fh.write(data))

    def _raw_put_file(self, key: str, path: Path) -> None:
        def copy(fh: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, _CHUNK)

        self._write_atomic(self._path(key), copy)

    def _raw_get(self, key: str) -> bytes:
        p = self._path(key)
        try:
            return p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"key '{key}' not found in {self.describe()}") from None
        except OSError as exc:
            raise self._oserror(exc, f"read '{key}'") from exc

    def _raw_get_file(self, key: str, dest: Path) -> None:
        p = self._path(key)
        if not p.is_file():
            raise KeyNotFound(f"key '{key}' not found in {self.describe()}")
        try:
            shutil.copyfile(p, dest)
        except OSError as exc:
            raise self._oserror(exc, f"read '{key}'") from exc

    def _raw_exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _raw_delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise self._oserror(exc, f"delete '{key}'") from exc

    def _raw_list(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix pins down.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.is_dir():
            return []
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _is_temp_name(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._oserror(exc, "create the root directory") from exc
        if not self.root.is_dir():
            raise StoreError(f"local store root {self.root} is not a directory")
        self._probe()


# --------------------------------------------------------------------------- S3 backend


def _client_error_code(exc: Any) -> tuple[str, int | None]:
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code") or "")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status


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
            return StoreUnreachable(f"S3 endpoint {ep} did not answer {op} of {where} within {self.read_timeout:g} s")
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
