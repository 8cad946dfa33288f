"""Artifact-store core: the :class:`ArtifactStore` interface, key/sha256 helpers, the backend registry.

The backends live in :mod:`pruning.artifacts.local` and :mod:`pruning.artifacts.s3`; importing
:mod:`pruning.artifacts` registers both.

Every checkpoint, report and decision of a pruning run is written through an
:class:`ArtifactStore`.  Keys are POSIX-style relative strings such as
``runs/<run_id>/history.jsonl``.  Backends are picked from a URL::

    store = open_store("runs-store")                    # LocalStore (a directory)
    store = open_store("file:///data/pruner")           # LocalStore
    store = open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:8333")
    store.check()                                       # fail fast, one-line error

Integrity: every ``put_*`` also writes a sidecar ``<key>.sha256`` (``sha256sum``
format), and every ``get_*`` verifies the bytes against the sidecar and against an
explicit ``sha256=`` argument when given; a mismatch, or an object without a sidecar,
raises :class:`ChecksumMismatch`.  Writes are atomic (temp file + ``os.replace``
locally, a single PUT / completed multipart upload on S3).

Crash consistency: a key and its sidecar are two objects, so they are written in an
order that a crash anywhere cannot turn into a false alarm.  First a *pending* sidecar
that accepts both the new and the previous digest, then the object, then the final
sidecar with the new digest only (skipped when equal to the pending one).  A process
killed between any two of these writes leaves the key readable as either its old or its
new content, both verified; flipped bytes match neither and are still refused.

Concurrency: one writer per key.  ``append_jsonl`` is a read-modify-write,
serialised within one store object (thread lock) but not across processes; a run's
lease (:mod:`pruning.artifacts.lease`) keeps a second process off the same run.
The conditional primitives (:meth:`ArtifactStore.create_if_absent`,
:meth:`ArtifactStore.read_versioned`, :meth:`ArtifactStore.replace_if`) are what the
lease is built on: exclusive create and compare-and-swap (S3 ``If-None-Match`` /
``If-Match``; a link + file lock locally).

Errors are :class:`StoreError` subclasses with one-line messages that never
contain secrets; :func:`is_transient_store_error` tells retry logic (e.g. a
Prefect ``retry_condition_fn``) which of them are worth retrying.

This package deliberately has no Prefect imports.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

from pydantic import BaseModel, Field

from pruning.artifacts.errors import BucketNotFound, ChecksumMismatch, KeyNotFound, StoreError
from pruning.errors import load_failure

__all__ = [
    "ArtifactStore",
    "StoreConfig",
    "SIDECAR_SUFFIX",
    "available_schemes",
    "file_sha256",
    "open_store",
    "register_store",
    "sha256_hex",
    "validate_key",
]

SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- helpers


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
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


def _sidecar_lines(digests: list[str], key: str) -> bytes:
    """The committed digest first; a pending sidecar adds the digests it still accepts."""
    return b"".join(_sidecar_text(d, key) for d in digests)


def _parse_sidecar(raw: bytes, key: str) -> list[str]:
    """Digests a sidecar accepts (the first is the newest)."""
    lines = raw.decode("ascii", errors="replace").splitlines()
    digests = [ln.split(maxsplit=1)[0].lower() for ln in lines if ln.strip()]
    if not digests or not all(_HEX64.match(d) for d in digests):
        raise ChecksumMismatch(f"checksum sidecar for key '{key}' is malformed")
    return digests


def _drop_sidecars(keys: list[str]) -> list[str]:
    """Hide ``<key>.sha256`` sidecars (also the orphan of a write that crashed before its object)."""
    return sorted(k for k in keys if not k.endswith(SIDECAR_SUFFIX))


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
    def _raw_create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if absent, atomically; False when it exists."""

    @abc.abstractmethod
    def _raw_get_versioned(self, key: str) -> tuple[bytes, str]:
        """The bytes and a version token (ETag, content hash) for :meth:`_raw_replace_if`."""

    @abc.abstractmethod
    def _raw_replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Replace ``key`` only if it is still at ``version``; False when it changed or vanished."""

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
        self._write_checked(key, digest, lambda: self._raw_put(key, data))
        return digest

    def _write_checked(self, key: str, digest: str, write: Callable[[], None]) -> None:
        """Pending sidecar (new + previous digests), the object, the final sidecar: crash-safe in any order."""
        previous = self._sidecar_digests(key) or []
        pending = [digest] + [d for d in previous if d != digest][:3]
        if previous != pending:
            self._raw_put(key + SIDECAR_SUFFIX, _sidecar_lines(pending, key))
        write()
        if pending != [digest]:
            self._raw_put(key + SIDECAR_SUFFIX, _sidecar_lines([digest], key))

    def _sidecar_digests(self, key: str) -> list[str] | None:
        try:
            raw = self._raw_get(key + SIDECAR_SUFFIX)
        except (KeyNotFound, BucketNotFound):  # a missing bucket is created by the write (create_bucket=True)
            return None
        try:
            return _parse_sidecar(raw, key)
        except ChecksumMismatch:
            return None  # a malformed sidecar is replaced by the next write

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
        return _parse_sidecar(raw, key)[0]

    def _verify(self, key: str, actual: str, expected: str | None) -> None:
        where = f"key '{key}' at {self.url_for(key)}"
        if expected is not None and actual != expected:
            raise ChecksumMismatch(f"checksum mismatch for {where}: expected sha256 {expected[:12]}…, "
                                   f"got {actual[:12]}…")
        try:
            raw = self._raw_get(key + SIDECAR_SUFFIX)
        except KeyNotFound:
            raise ChecksumMismatch(f"{where} has no checksum sidecar ({key}{SIDECAR_SUFFIX} was deleted, or the "
                                   "object was written outside agentic-pruner); refusing to use it") from None
        accepted = _parse_sidecar(raw, key)
        if actual not in accepted:
            raise ChecksumMismatch(f"checksum mismatch for {where}: sidecar says sha256 {accepted[0][:12]}…, "
                                   f"content is {actual[:12]}… (corrupted or modified)")

    # ---- conditional writes (small control objects such as a run's lease; no sidecar)
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Atomically create ``key``; False if it already exists (exactly one of two racing writers wins)."""
        return self._raw_create(validate_key(key), bytes(data))

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """``key``'s bytes and a version token for :meth:`replace_if`; raises KeyNotFound."""
        return self._raw_get_versioned(validate_key(key))

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Compare-and-swap: replace ``key`` only if nobody changed it since ``read_versioned``."""
        return self._raw_replace_if(validate_key(key), bytes(data), version)

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
        digest = file_sha256(src)
        self._write_checked(key, digest, lambda: self._raw_put_file(key, src))
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
            self._verify(key, file_sha256(tmp), expected)
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
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # refused pickles, truncated files
            raise StoreError(f"cannot load key '{key}' at {self.url_for(key)}: {load_failure(exc)}") from None

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
