"""Local-directory artifact store: atomic writes via a temp file + ``os.replace``."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

from pruning.artifacts.base import _CHUNK, ArtifactStore, _scheme_of, register_store, sha256_hex, validate_key
from pruning.artifacts.errors import KeyNotFound, StoreAuthError, StoreError

__all__ = ["LocalStore"]


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

    def _write_atomic(self, dest: Path, writer: Callable[[Any], None], exclusive: bool = False) -> bool:
        """Write a temp file and move it into place (``exclusive``: hard-link, so an existing ``dest`` wins)."""
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
            if exclusive:
                os.link(tmp, dest)
            else:
                os.replace(tmp, dest)
            return True
        except FileExistsError:
            if exclusive:
                return False
            raise
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

    def _raw_create(self, key: str, data: bytes) -> bool:
        return self._write_atomic(self._path(key), lambda fh: fh.write(data), exclusive=True)

    def _raw_get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self._raw_get(key)
        return data, sha256_hex(data)

    def _raw_replace_if(self, key: str, data: bytes, version: str) -> bool:
        dest = self._path(key)
        try:  # compare and swap under an advisory lock shared by every process on this file system
            lock = os.open(dest.parent / f".{dest.name}.cas.tmp", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise self._oserror(exc, f"lock '{key}'") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self._raw_get(key)
            except KeyNotFound:
                return False
            if sha256_hex(current) != version:
                return False
            self._raw_put(key, data)
            return True
        finally:
            os.close(lock)

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
        try:  # leave no trace of the probe
            (self.root / ".store-check").rmdir()
        except OSError:
            pass
