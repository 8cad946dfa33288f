"""Screenshots of what a user sees in the Prefect UI for a run (not part of CI).

Starts a private ``prefect server`` on loopback (with ``PREFECT_UI_API_URL`` pointing at its own port: the
UI asks the port in that setting, not the one the server listens on), runs a small pruning run against
it, serves the flow as a cron deployment for a moment, and takes headless-Chromium screenshots of the
run page, every artifact of the run (revisions and latency tables, MAC and accuracy plots, summary,
progress) and the deployments page::

    python benchmarks/ui_screenshots.py --out /tmp/ui-shots      # needs Debian's chromium

Each PNG is named for what it shows; the script prints the list.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the embedded default (digits ResNet-18, trained once and cached): real accuracies in the tables
QUICK = ["--target-macs", "50%", "--max-revisions", "3", "--extra-revisions", "1", "--inline-epochs", "1",
         "--extended-epochs", "1", "--latency-runs", "5"]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(), method="POST" if body is not None
                                 else "GET", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_up(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"prefect server at {url} did not come up")


def screenshot(chrome: str, url: str, out: Path, work: Path, height: int = 1100) -> None:
    """The page after its scripts ran (virtual time lets the single-page app fetch and render)."""
    subprocess.run([chrome, *CHROME_FLAGS, f"--user-data-dir={work / out.stem}", f"--window-size=1600,{height}",
                    "--virtual-time-budget=20000", f"--screenshot={out}", url], check=True, capture_output=True,
                   timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("ui-screenshots"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ui-shots-"))
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=f"{ui}/api", PREFECT_API_URL=f"{ui}/api")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        wait_up(f"{ui}/api")
        print("run:", " ".join(QUICK), flush=True)
        subprocess.run([str(BIN / "agentic-pruner"), "run", *QUICK, "--store", str(work / "store")], env=env,
                       cwd=ROOT, check=True)
        served = subprocess.Popen([str(BIN / "agentic-pruner"), "serve", "--name", "nightly", "--cron", "0 3 * * *",
                                   *QUICK, "--store", str(work / "store")], env=env, cwd=ROOT,
                                  stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        run = next(r for r in api(f"{ui}/api", "/flow_runs/filter", {}) if r["name"].startswith("prune-"))
        shots = {"run-page": f"{ui}/runs/flow-run/{run['id']}"}
        for a in api(f"{ui}/api", "/artifacts/filter", {}):
            if a["flow_run_id"] == run["id"]:
                shots[f"artifact-{a['type']}-{re.sub(r'^.*-[0-9a-f]{8}-[0-9a-f]{6}-', '', a['key'])}"] = f"{ui}/artifacts/artifact/{a['id']}"
        time.sleep(15)  # the served deployment registers
        shots["deployments"] = f"{ui}/deployments"
        for name, url in shots.items():
            screenshot(args.chromium, url, args.out / f"{name}.png", work)
            print(f"{args.out / f'{name}.png'}  <- {url}", flush=True)
    finally:
        for proc in (served, server):
            if proc is not None:
                os.killpg(proc.pid, 15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
