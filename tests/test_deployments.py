"""Scheduled deployments the way a user runs them: a real ``prefect server start`` whose scheduler creates
the runs, and ``agentic-pruner serve`` (with run options) executing them to completion."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from prefect_server import BIN, ROOT, clean_env, prefect_server, start, stop

pytestmark = pytest.mark.slow

QUICK = ["--model", "resnet18", "--num-classes", "10", "--target-macs", "45%", "--max-revisions", "1",
         "--extra-revisions", "0", "--inline-epochs", "1", "--extended-epochs", "0", "--max-train-batches", "2",
         "--calibration-batches", "1", "--no-latency"]


def _client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=api)


def test_cron_schedule_creates_runs_that_serve_completes(tmp_path):
    """The server's scheduler turns a cron schedule into runs (SQLAlchemy 2.1 broke this with Prefect 3.8.8),
    and a served deployment runs them with the options given to ``serve`` (not the flow's defaults)."""
    env = clean_env(tmp_path / "prefect", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
                    PREFECT_RUNNER_POLL_FREQUENCY="2", OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    with prefect_server(env, tmp_path / "server.log") as api:
        env["PREFECT_API_URL"] = api
        served = start([str(BIN / "agentic-pruner"), "serve", "--name", "every-minute", "--cron", "* * * * *",
                        *QUICK, "--store", str(store)], env, tmp_path / "serve.log")
        client = _client(api)
        try:
            done = None
            deadline = time.time() + 420
            while done is None and time.time() < deadline:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                runs = client.read_flow_runs()
                done = next((r for r in runs if r.state and r.state.is_completed()), None)
                failed = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
                assert not failed, (failed[0].state.message, (tmp_path / "serve.log").read_text()[-3000:])
                time.sleep(2)
            assert done is not None, (tmp_path / "serve.log").read_text()[-3000:]
        finally:
            stop(served)
        deployment = client.read_deployment(done.deployment_id)
        assert deployment.name == "every-minute" and deployment.schedules
        assert done.auto_scheduled, "the run was not created by the server's scheduler"
        _check_artifacts(client, done.id)
    server_log = (tmp_path / "server.log").read_text()
    assert "InvalidRequestError" not in server_log and "bulk DML" not in server_log, server_log[-3000:]
    # the served run pruned what `serve` was told to (its store and target), not RunConfig() defaults
    statuses = list(store.glob("*/status.json"))
    assert len(statuses) == 1, statuses
    status = json.loads(statuses[0].read_text())
    assert status["state"] == "completed" and status["target"] == "45%", status
    assert statuses[0].parent.name.startswith("resnet18-45pct-heuristic-")


def _check_artifacts(client, flow_run_id) -> None:
    """What the UI shows for the run: one revisions table (rounded, named columns), the plots as images,
    a progress bar that says where the search ended, unique task names."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type: dict[str, list] = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    tables = [a for a in by_type.get("table", []) if a.key and a.key.endswith("-revisions")]
    assert len(tables) == 1, [a.key for a in arts]
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert "val acc after inline FT (%)" in rows[0] and "MACs (G)" in rows[0]
    assert all(v is None or len(str(v).split(".")[-1]) <= 4 for r in rows for v in r.values() if isinstance(v, float))
    images = {a.key.rsplit("-", 2)[-2] + "-" + a.key.rsplit("-", 1)[-1] for a in by_type.get("image", [])}
    assert images == {"mac-plot", "accuracy-plot"}, images
    assert all(a.data.startswith("data:image/png;base64,") for a in by_type["image"])
    progress = by_type["progress"][0]
    assert "search done after 1 revision" in (progress.description or ""), progress.description
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = [t.name for t in tasks]
    assert len(names) == len(set(names)), sorted(names)
    assert {"prune-r0c0", "finetune-r0c0", "propose-r0", "store-final/summary.md"} <= set(names), sorted(names)


def test_serve_rejects_bad_options_before_serving(tmp_path):
    env = clean_env(tmp_path / "prefect")
    done = subprocess.run([str(BIN / "agentic-pruner"), "serve", "--target-macs", "2.0X", "--store",
                           str(tmp_path / "s")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "malformed MAC count" in done.stderr.strip().splitlines()[-1] and done.stderr.startswith("error: ")
