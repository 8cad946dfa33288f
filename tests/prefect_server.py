"""A real ``prefect server start`` on loopback for tests, and process helpers (start, stop a group, wait)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from s3_server import free_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start(cmd, env, log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log``."""
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """TERM the process group twice (Prefect workers ignore the first), then KILL."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace / 2)
        except subprocess.TimeoutExpired:
            pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{url} server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {timeout} s")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without PREFECT_* / AWS_* settings, with a private PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", **extra)
    home.mkdir(parents=True, exist_ok=True)
    return env


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """``prefect server start`` on a free loopback port; yields the API URL and stops the server after."""
    port = free_ports(1)[0]
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)
