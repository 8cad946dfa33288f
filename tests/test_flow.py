"""The Prefect flow end to end: local and S3 stores, resume, preemption, corruption, secrets."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness
from s3_server import seaweed_s3

from pruning.artifacts import ChecksumMismatch, open_store, runs
from tasks.config import RunConfig

pytestmark = pytest.mark.slow

QUICK = dict(model="resnet18", num_classes=10, data="digits", target_macs="45%", max_revisions=4, extra_revisions=1,
             inline_epochs=1, extended_epochs=1, max_train_batches=3, calibration_batches=1, latency=False)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def flow_fn(harness):
    from flows.agentic_prune import agentic_prune

    return agentic_prune


def _history(store_url, run_id):
    return runs.read_history(open_store(store_url), run_id)


def test_flow_local_store_and_rerun_resumes(flow_fn, tmp_path):
    cfg = RunConfig(store=str(tmp_path / "store"), **QUICK)
    summary = flow_fn(cfg)
    store = open_store(cfg.store)
    history = _history(cfg.store, summary.run_id)
    assert [r["revision"] for r in history] == list(range(len(history)))
    assert summary.best_revision is not None and summary.achieved_macs is not None
    lower, upper = summary.target_macs * 0.85, summary.target_macs * 1.05
    assert lower <= summary.achieved_macs <= upper
    for rec in history:
        if rec["in_band"]:
            assert store.stored_sha256(rec["checkpoint_key"]) == rec["checkpoint_sha256"]
    for name in ("config.json", "baseline.json", "profile.json", "final/model.pt", "final/summary.md", "final/macs.png"):
        assert store.exists(runs.key(summary.run_id, name)), name
    assert runs.read_status(store, summary.run_id)["state"] == "completed"
    # the same configuration again: nothing is recomputed, the result is identical
    again = flow_fn(cfg)
    assert again.run_id == summary.run_id and again.new_revisions == 0
    assert again.resumed_revisions == len(history)
    assert again.best_revision == summary.best_revision and again.final_test_accuracy == summary.final_test_accuracy
    assert len(_history(cfg.store, summary.run_id)) == len(history)


def test_corrupted_checkpoint_detected_on_resume(flow_fn, tmp_path):
    cfg = RunConfig(store=str(tmp_path / "store"), **{**QUICK, "max_revisions": 2, "extra_revisions": 0})
    summary = flow_fn(cfg)
    store = open_store(cfg.store)
    best = next(r for r in _history(cfg.store, summary.run_id) if r["revision"] == summary.best_revision)
    path = Path(cfg.store) / best["checkpoint_key"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store.delete(runs.key(summary.run_id, "final/model.json"))  # force the final step to read the revision again
    with pytest.raises(ChecksumMismatch):
        flow_fn(cfg)
    assert runs.read_status(store, summary.run_id)["state"] == "failed"


def test_flow_on_s3_keeps_secrets_out(flow_fn, tmp_path, monkeypatch):
    secret_key = "sk-test-secret-do-not-store-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret_key)
    with seaweed_s3() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        s3.create_bucket("prune")
        cfg = RunConfig(store="s3://prune/team-a", **{**QUICK, "max_revisions": 2, "extra_revisions": 0,
                                                       "latency": True, "latency_runs": 2})
        summary = flow_fn(cfg)
        store = open_store(cfg.store)
        keys = store.list(f"{summary.run_id}/")
        assert any(k.endswith("history.jsonl") for k in keys) and any(k.endswith("final/pruned.onnx") for k in keys)
        aws_secret = s3.credentials["aws_secret_access_key"]
        for k in keys:  # the lease is a control object without a checksum sidecar
            blob = store.read_versioned(k)[0] if k.endswith("/lease.json") else store.get_bytes(k)
            assert secret_key.encode() not in blob and aws_secret.encode() not in blob, k
        assert aws_secret not in store.describe()


def test_cli_rejects_bad_storage_before_work(tmp_path, monkeypatch, capsys):
    from agentic_pruner.cli import main

    with seaweed_s3() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        assert main(["run", "--store", "s3://prune/x", "--model", "resnet18", "--num-classes", "10"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "wrong-secret" not in err
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        assert main(["run", "--store", "s3://no-such-bucket/x", "--model", "resnet18", "--num-classes", "10"]) == 2
        assert "bucket" in capsys.readouterr().err.lower()


def _cli(*args, env):
    return [sys.executable, "-m", "agentic_pruner.cli", *args]


def test_preemption_then_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL the run after revision 1 is persisted; `resume` finishes it with nothing lost or duplicated."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONUNBUFFERED": "1"}
    common = ["--model", "resnet18", "--num-classes", "10", "--target-macs", "45%", "--max-revisions", "4",
              "--extra-revisions", "2", "--inline-epochs", "1", "--extended-epochs", "1", "--max-train-batches", "3",
              "--calibration-batches", "1", "--no-latency"]
    killed_store = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli("run", "--store", killed_store, *common, env=env), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = open_store(killed_store)
    run_id = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            ids = [k.split("/")[0] for k in store.list() if k.endswith("/history.jsonl")]
            if ids and len(runs.read_history(store, ids[0])) >= 2:
                run_id = ids[0]
                break
            assert proc.poll() is None, "run ended before it could be preempted"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run_id is not None, "no revision was persisted in time"
    persisted = len(runs.read_history(store, run_id))
    assert runs.read_status(store, run_id)["state"] == "running"  # died without a chance to say so

    resumed = subprocess.run(_cli("resume", run_id, "--store", killed_store, env=env), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = runs.read_history(store, run_id)
    assert [r["revision"] for r in history] == list(range(len(history)))  # each revision exactly once
    assert len(history) > persisted - 0
    keys = [r["checkpoint_key"] for r in history if r["checkpoint_key"]]
    assert len(keys) == len(set(keys)) and all(store.exists(k) for k in keys)

    clean_store = str(tmp_path / "clean")
    clean = subprocess.run(_cli("run", "--store", clean_store, *common, env=env), env=env, capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    reference = runs.read_history(open_store(clean_store), run_id)
    strip = lambda rs: [(r["revision"], r["achieved_macs"], r["accuracy_after"], r["checkpoint_sha256"]) for r in rs]
    assert strip(history) == strip(reference)
    assert runs.read_status(store, run_id)["best_revision"] == runs.read_status(open_store(clean_store), run_id)["best_revision"]


def test_storage_outage_retried_then_resume_after_long_outage(flow_fn, monkeypatch):
    """A short S3 outage is absorbed by task retries; a long one fails the run clearly and resume completes it."""
    import threading

    from pruning.artifacts import StoreError

    with seaweed_s3() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        s3.create_bucket("prune")
        cfg = RunConfig(store="s3://prune/outage", **{**QUICK, "max_revisions": 3, "extra_revisions": 1})
        store = open_store(cfg.store)
        outcome = {}

        def run():
            try:
                outcome["summary"] = flow_fn(cfg)
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

        # 1) short outage right after the first revision is persisted: retries carry the run through
        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 300
        while time.time() < deadline and t.is_alive():
            ids = [k.split("/")[0] for k in store.list() if k.endswith("/history.jsonl")]
            if ids and runs.read_history(store, ids[0]):
                break
            time.sleep(0.2)
        s3.stop()
        time.sleep(2.0)
        s3.start()
        t.join(600)
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        history = runs.read_history(store, summary.run_id)
        assert [r["revision"] for r in history] == list(range(len(history)))

        # 2) the store stays down: the run fails with a clear error; once it is back, the same run completes
        cfg2 = cfg.model_copy(update={"run_id": "outage-long"})
        s3.stop()
        with pytest.raises(Exception) as info:
            flow_fn(cfg2)
        assert isinstance(info.value, StoreError) and "cannot reach" in str(info.value)
        s3.start()
        done = flow_fn(cfg2)
        assert done.best_revision is not None
        again = runs.read_history(store, "outage-long")
        assert [r["revision"] for r in again] == list(range(len(again)))


@pytest.mark.parametrize("replies", ["http-500", "garbage"])
def test_user_error_inside_the_flow_is_one_line(tmp_path, replies):
    """A failure found only inside the flow (the LLM endpoint answered the pre-flight check, then fails every
    proposal, and fallback is disabled): exit 2, one `error:` line, no traceback anywhere in the output; the
    run's status says what happened. (Bad input knowable earlier never reaches the flow: test_preflight.py.)"""
    from llm_server import Reply, ScriptedLLMServer

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    store = tmp_path / "store"
    with ScriptedLLMServer(models=["m"]) as srv:
        if replies == "garbage":
            srv.push(*[Reply.text("no json at all")] * 3)
        done = subprocess.run(_cli("run", "--store", str(store), "--no-latency", "--strategist", "llm",
                                   "--llm-base-url", srv.base_url, "--llm-model", "m", "--no-llm-fallback", env=env),
                              env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    needle = "http 500" if replies == "http-500" else "invalid llm output"
    assert done.returncode == 2 and last.startswith("error: ") and needle in last.lower(), out[-3000:]
    assert "fallback is disabled" in last
    assert "Traceback" not in out, out[-3000:]
    statuses = list(store.glob("*/status.json"))
    assert statuses and all('"failed"' in s.read_text() for s in statuses)
