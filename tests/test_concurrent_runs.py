"""Two identical runs at once on one store (what overlapping scheduled runs do): one works, the other stops
with one line; the run then resumes and reports with each (revision, candidate) exactly once."""
import subprocess
import sys

import pytest
from prefect_server import clean_env, prefect_server
from s3_server import seaweed_s3

from pruning.artifacts import open_store, runs

pytestmark = pytest.mark.slow

ARGS = ["--max-revisions", "2", "--extra-revisions", "1", "--candidates-per-revision", "2", "--inline-epochs", "1",
        "--extended-epochs", "0", "--max-train-batches", "1", "--calibration-batches", "1", "--no-latency"]


def _cli(*args):
    return [sys.executable, "-m", "agentic_pruner.cli", *args]


def _two_at_once(store: str, env: dict) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(_cli("run", "--store", store, *ARGS), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _check(store_url: str, env: dict, done: list[subprocess.CompletedProcess]) -> None:
    codes = sorted(d.returncode for d in done)
    for d in done:
        assert "Traceback" not in d.stderr, d.stderr[-3000:]
    if codes == [0, 2]:  # the usual case: the second found the first's lease
        loser = next(d for d in done if d.returncode == 2)
        last = loser.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "is already running" in last, loser.stderr[-2000:]
    else:  # the first had finished before the second looked: the second resumed a finished run
        assert codes == [0, 0], [d.stderr[-2000:] for d in done]
    again = subprocess.run(_cli("run", "--store", store_url, *ARGS), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " 0 new + " in again.stdout, again.stdout  # everything was already there
    store = open_store(store_url)
    (run_id,) = {k.split("/")[0] for k in store.list() if k.endswith("/config.json")}
    slots = [(r["revision"], r["candidate"]) for r in runs.read_history(store, run_id)]
    assert slots and len(slots) == len(set(slots)), slots
    report = subprocess.run(_cli("report", run_id, "--store", store_url), env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    status = runs.read_status(store, run_id)
    assert status["state"] == "completed"
    lease = store.read_versioned(f"{run_id}/lease.json")[0]
    assert b'"released": true' in lease


@pytest.fixture(scope="module")
def api_env(tmp_path_factory):
    """One real Prefect server for both backends: the CLI processes report to it instead of each starting one."""
    home = tmp_path_factory.mktemp("prefect")
    env = clean_env(home)
    with prefect_server(env, home / "server.log") as api:
        yield {**env, "PREFECT_API_URL": api}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_identical_runs_at_once(tmp_path, backend, monkeypatch, api_env):
    env = dict(api_env)
    if backend == "local":
        store = str(tmp_path / "store")
        _check(store, env, _two_at_once(store, env))
        return
    with seaweed_s3() as s3:
        env.update(s3.env())
        for k, v in s3.env().items():  # this process reads the store too
            monkeypatch.setenv(k, v)
        s3.create_bucket("prune")
        _check("s3://prune/team", env, _two_at_once("s3://prune/team", env))
