"""A run's lease: one process works on a run at a time, and a crashed holder never blocks its resume for long.

The lease is a small JSON object ``<run_id>/lease.json`` written with the store's conditional
primitives (S3 ``If-None-Match: *`` / ``If-Match: <etag>``; a hard link and a file lock locally), so
of two runs started at once exactly one gets it. The holder renews it every ``heartbeat_s`` seconds
from a background thread; it expires ``ttl_s`` seconds after the last renewal. Another process may
take it over when it was released, when it expired, or at once when its holder was a process on
this host that no longer exists (a ``kill -9``). A holder whose lease was taken over (it stalled
past the expiry) notices at its next :meth:`RunLease.check` and stops.

A second run finding a live holder stops with one line (:class:`RunBusy`). When the holder looks
dead (no renewal for three heartbeats, e.g. a preempted machine) it waits out the expiry instead.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pydantic import BaseModel

from pruning.artifacts.base import ArtifactStore
from pruning.artifacts.errors import KeyNotFound, StoreError, is_transient_store_error

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"


class RunBusy(StoreError):
    """Another live process holds the run's lease."""


class LeaseLost(StoreError):
    """This process's lease was taken over (it stalled past the expiry); it must stop writing."""


class LeaseInfo(BaseModel):
    """What ``lease.json`` holds: who works on the run, and until when."""

    owner: str
    host: str
    pid: int
    acquired: str
    renewed: float
    expires: float
    released: bool = False

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {self.acquired}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLease:
    """Exclusive, expiring ownership of ``<run_id>/`` in a store; use as a context manager."""

    def __init__(self, store: ArtifactStore, run_id: str, *, ttl_s: float = 90.0, heartbeat_s: float = 15.0,
                 max_wait_s: float | None = None):
        self.store, self.run_id = store, run_id
        self.key = f"{run_id}/{LEASE_NAME}"
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.max_wait_s = self.ttl_s + self.heartbeat_s if max_wait_s is None else float(max_wait_s)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._version: str | None = None
        self._acquired = ""
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading
    def holder(self) -> LeaseInfo | None:
        """The current lease, or None when there is none (or it is unreadable: treated as expired)."""
        try:
            return self._read()[0]
        except KeyNotFound:
            return None

    def _read(self) -> tuple[LeaseInfo | None, str]:
        data, version = self.store.read_versioned(self.key)
        try:
            return LeaseInfo(**json.loads(data)), version
        except (ValueError, TypeError):
            return None, version

    def is_free(self, info: LeaseInfo | None, now: float) -> bool:
        """Released, expired, malformed, or held by a dead process on this host."""
        return (info is None or info.released or info.expires <= now
                or (info.host == self.host and info.pid != self.pid and not _pid_alive(info.pid)))

    def _body(self, now: float, released: bool = False) -> bytes:
        info = LeaseInfo(owner=self.owner, host=self.host, pid=self.pid, acquired=self._acquired or _iso(now),
                         renewed=now, expires=now + self.ttl_s, released=released)
        return json.dumps(info.model_dump()).encode()

    # ---- acquiring
    def acquire(self) -> "RunLease":
        """Take the lease, waiting out a dead holder's expiry; raise :class:`RunBusy` for a live holder."""
        deadline = time.time() + self.max_wait_s
        while True:
            now = time.time()
            self._acquired = _iso(now)
            if self.store.create_if_absent(self.key, self._body(now)):
                return self._took(None)
            try:
                info, version = self._read()
            except KeyNotFound:
                continue  # released and deleted in between: try to create again
            if self.is_free(info, now):
                if self.store.replace_if(self.key, self._body(now), version):
                    return self._took(info)
                continue  # another process took it first: look again
            silent = now - info.renewed
            if silent < 3 * self.heartbeat_s or info.expires > deadline:
                raise RunBusy(f"run {self.run_id} is already running ({info.describe()}, renewed {silent:.0f} s "
                              f"ago); wait for it to finish, then run the same command again to resume it")
            log.info("run %s: lease of %s not renewed for %.0f s; waiting %.0f s for it to expire", self.run_id,
                     info.describe(), silent, info.expires - now)
            time.sleep(max(0.2, min(info.expires - now + 0.1, self.heartbeat_s)))

    def _took(self, previous: LeaseInfo | None) -> "RunLease":
        _, self._version = self.store.read_versioned(self.key)
        if previous is not None and not previous.released:
            log.info("run %s: took over the expired lease of %s", self.run_id, previous.describe())
        return self

    # ---- holding
    def renew(self) -> None:
        """Push the expiry forward; marks the lease lost when another process took it."""
        info, version = self._read()
        if info is None or info.owner != self.owner:
            self._lost.set()
            return
        if self.store.replace_if(self.key, self._body(time.time()), version):
            self._version = version
        else:
            self._lost.set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another process took this run over (call before writing results)."""
        if self._lost.is_set():
            holder = self.holder()
            raise LeaseLost(f"run {self.run_id} was taken over by {holder.describe() if holder else 'another process'} "
                            f"after this process stalled for more than {self.ttl_s:g} s; stopping")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # a short outage: the next beat tries again, the expiry covers the gap
                log.warning("run %s: could not renew the lease (%s)", self.run_id, str(exc)[:200])
            if self._lost.is_set():
                return

    def release(self) -> None:
        """Mark the lease released (kept as a record of the last holder)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            info, version = self._read()
            if info is not None and info.owner == self.owner:
                self.store.replace_if(self.key, self._body(time.time(), released=True), version)
        except StoreError as exc:  # unreachable store: the lease simply expires
            log.warning("run %s: could not release the lease (%s); it expires in %.0f s", self.run_id,
                        str(exc)[:200], self.ttl_s)

    def __enter__(self) -> "RunLease":
        for delay in (2, 5, None):  # a short outage at the start of a run is retried like any store write
            try:
                self.acquire()
                break
            except StoreError as exc:
                if delay is None or not is_transient_store_error(exc):
                    raise
                log.warning("run %s: %s; retrying in %d s", self.run_id, exc, delay)
                time.sleep(delay)
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
