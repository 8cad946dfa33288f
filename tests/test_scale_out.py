"""K candidates per revision on real engines: the local runner, a loopback Dask cluster (with a worker
killed mid-task) and a Prefect process work pool with two workers, all against one Prefect server and
an S3 store; the history semantics must be identical everywhere."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prefect_server import BIN, ROOT, clean_env, prefect_server, start, stop
from s3_server import free_ports, seaweed_s3

from pruning.artifacts import open_store, runs
from tasks.config import RunConfig

pytestmark = pytest.mark.slow

K = 2
QUICK = ["--model", "resnet18", "--num-classes", "10", "--target-macs", "45%", "--max-revisions", "2",
         "--extra-revisions", "3", "--inline-epochs", "1", "--extended-epochs", "0", "--max-train-batches", "3",
         "--calibration-batches", "1", "--no-latency", "--candidates-per-revision", str(K)]
SAME = ["--max-train-batches", "10"]  # local, work pool and Ray run the very same search


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A Prefect server and an S3 server on loopback; the environment every process of the tests shares."""
    tmp = tmp_path_factory.mktemp("scale_out")
    base = clean_env(tmp / "prefect", OMP_NUM_THREADS="1", AGENTIC_PRUNER_HOME=str(ROOT),
                     PREFECT_WORKER_QUERY_SECONDS="1")
    with prefect_server(base, tmp / "server.log") as api:
        base["PREFECT_API_URL"] = api
        with seaweed_s3() as s3:
            base.update(s3.env())
            s3.create_bucket("scale")
            yield base, tmp


def _run_cli(args, env, log: Path, timeout=900) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        return subprocess.run([str(BIN / "agentic-pruner"), "run", *QUICK, *args], env=env, stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)


def _check_history(store_url: str, env: dict, expect_revisions: int = 2) -> list[dict]:
    """Same semantics on every engine: one record per (revision, candidate), each checkpoint in the store once."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        if k in env:
            os.environ[k] = env[k]
    store = open_store(store_url)
    run_ids = sorted({k.split("/")[0] for k in store.list() if k.endswith("/history.jsonl")})
    assert len(run_ids) == 1, run_ids
    history = runs.read_history(store, run_ids[0])
    slots = [(r["revision"], r["candidate"]) for r in history]
    assert sorted(slots) == [(r, c) for r in range(expect_revisions) for c in range(K)], slots
    keys = [r["checkpoint_key"] for r in history if r["in_band"]]
    assert keys and len(keys) == len(set(keys))
    for r in history:
        if r["in_band"]:
            assert store.stored_sha256(r["checkpoint_key"]) == r["checkpoint_sha256"]
            assert r["accuracy_after"] is not None
    stored = set(store.list(f"{run_ids[0]}/revisions/"))
    for r in history:  # a fine-tuned candidate's pre-fine-tuning bundle was cleaned up
        if r["accuracy_after"] is not None:
            assert runs.key(run_ids[0], runs.slot_name(r["revision"], r["candidate"], ".pruned.pt")) not in stored
    assert len({r["signature"] for r in history}) == len(history)
    return history


def _workers(history: list[dict]) -> set[str]:
    return {n.split("fine-tuned on ", 1)[1] for r in history for n in r["proposal_notes"] if "fine-tuned on " in n}


def _prefect(env):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=env["PREFECT_API_URL"])


# -- the tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_history(env) -> list[dict]:
    """The reference search: the local runner (flow threads), run once per module."""
    base, tmp = env
    store = "s3://scale/local"
    done = _run_cli(["--store", store, *SAME], base, tmp / "local.log")
    assert done.returncode == 0, (tmp / "local.log").read_text()[-3000:]
    return _check_history(store, base)


def _assert_same_search(history: list[dict], reference: list[dict]) -> None:
    """Same config on another engine: the same records (slots, plans, MACs) and accuracies up to float noise."""
    keys = ("revision", "candidate", "move", "plan", "status", "achieved_macs", "allocation_digest", "in_band")
    assert [{k: r[k] for k in keys} for r in history] == [{k: r[k] for k in keys} for r in reference]
    for a, b in zip(history, reference):
        assert a["accuracy_after"] == pytest.approx(b["accuracy_after"], abs=0.02), a["revision"]


def test_local_runner_k_candidates(local_history):
    assert len({w.split(" (")[0] for w in _workers(local_history)}) == 1  # threads of the flow process


def test_dask_cluster_survives_a_killed_worker(env):
    base, tmp = env
    sched_port = free_ports(1)[0]
    scheduler = start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                        "--dashboard-address", ":0"], base, tmp / "scheduler.log")
    workers = []
    try:
        time.sleep(3)
        address = f"tcp://127.0.0.1:{sched_port}"
        for i in range(2):
            workers.append(start([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                   "--no-dashboard", "--name", f"w{i}"], base, tmp / f"worker{i}.log"))
        time.sleep(5)
        store = "s3://scale/dask"
        log = tmp / "dask-run.log"
        # longer fine-tuning so that a worker can be killed while it trains
        args = ["--store", store, "--task-runner", f"dask://127.0.0.1:{sched_port}", "--max-train-batches", "40"]
        with log.open("w") as f:
            run = subprocess.Popen([str(BIN / "agentic-pruner"), "run", *QUICK, *args], env=base, stdout=f,
                                   stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        client = _prefect(base)
        killed = False
        deadline = time.time() + 600
        try:
            while not killed and time.time() < deadline:
                assert run.poll() is None, log.read_text()[-3000:]
                running = [t for t in client.read_task_runs() if t.name.startswith("finetune-r0")
                           and t.state is not None and t.state.is_running()]
                if len(running) == K:  # both workers busy: whichever dies takes a running candidate with it
                    time.sleep(1.0)
                    os.killpg(workers[0].pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.3)
            assert killed, "never saw both candidates running"
            assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
        finally:
            stop(run)
        history = _check_history(store, base)
        # the killed worker finished nothing: its candidate was run again on the survivor, which did the rest
        assert len(_workers(history)) == 1, _workers(history)
        reruns = [t.name for t in client.read_task_runs() if t.name.startswith("finetune-r0") and sum(
            s.is_running() for s in client.read_task_run_states(t.id)) >= 2]
        assert len(reruns) == 1, reruns
        flows = [f for f in client.read_flow_runs() if f.name.startswith("prune-resnet18")]
        assert flows and all(f.state.is_completed() for f in flows if f.state and f.state.is_final())
        finetunes = [t for t in client.read_task_runs() if t.name.startswith("finetune-")]
        assert finetunes and all(t.state.is_completed() for t in finetunes), [
            (t.name, t.state.type) for t in finetunes]
    finally:
        for w in workers:
            stop(w)
        stop(scheduler)


def test_process_work_pool_with_two_workers(env, local_history):
    base, tmp = env
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "candidate-pool", "--type", "process"], env=base, cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                               "--name", "finetune-candidate/local"], env=base, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    workers = [start([prefect, "worker", "start", "--pool", "candidate-pool", "--type", "process", "--limit", "1",
                       "--name", f"pool-worker-{i}"], base, tmp / f"pool-worker{i}.log") for i in range(2)]
    client = _prefect(base)
    log = tmp / "pool-run.log"
    try:
        time.sleep(5)
        store = "s3://scale/pool"
        with log.open("w") as f:
            run = subprocess.Popen([str(BIN / "agentic-pruner"), "run", *QUICK, "--store", store,
                                    "--finetune-deployment", "finetune-candidate/local", *SAME], env=base, stdout=f,
                                   stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        # kill the machine under one candidate: its flow-run process dies mid-run, the worker reports the
        # run Crashed, and the search starts that candidate again
        killed = None
        deadline = time.time() + 600
        try:
            while killed is None and time.time() < deadline:
                assert run.poll() is None, log.read_text()[-3000:]
                for fr in client.read_flow_runs():
                    if (fr.name.startswith("finetune-r0") and fr.state and fr.state.is_running()
                            and fr.infrastructure_pid):
                        os.kill(int(str(fr.infrastructure_pid).rsplit(":", 1)[-1]), signal.SIGKILL)
                        killed = fr.id
                        break
                time.sleep(0.2)
            assert killed is not None, "never saw a candidate's flow run running"
            assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
        finally:
            stop(run)
    finally:
        for w in workers:
            stop(w)
    assert "crashed" in log.read_text() and client.read_flow_run(killed).state.is_crashed()
    history = _check_history(store, base)
    _assert_same_search(history, local_history)
    notes = [n for r in history for n in r["proposal_notes"]]
    assert sum("deployment run" in n for n in notes) == len(history)
    # the candidates ran in flow-run subprocesses of both workers (parent pid = the worker)
    worker_pids = {w.split("parent ")[1].rstrip(")") for w in _workers(history)}
    assert len(worker_pids) == 2, _workers(history)
    runs_ = [f for f in client.read_flow_runs() if f.name.startswith("finetune-r")]
    assert len(runs_) == len(history) + 1  # one candidate ran twice
    assert sum(f.state.is_completed() for f in runs_) == len(history)


def test_ray_local_cluster(env, local_history):
    pytest.importorskip("prefect_ray")
    base, tmp = env
    store = "s3://scale/ray"
    client = _prefect(base)
    before = {t.id for t in client.read_task_runs()}
    done = _run_cli(["--store", store, "--task-runner", "ray", *SAME], {**base, "RAY_AUTH_MODE": "disabled"},
                    tmp / "ray.log")
    assert done.returncode == 0, (tmp / "ray.log").read_text()[-3000:]
    history = _check_history(store, base)
    _assert_same_search(history, local_history)
    assert len(_workers(history)) == 2  # the candidates of a revision ran in two Ray worker processes
    # the Ray workers reported to the same Prefect API as the flow
    names = sorted(t.name for t in client.read_task_runs() if t.id not in before and t.name.startswith("finetune-")
                   and t.state and t.state.is_completed())
    assert names == ["finetune-r0c0", "finetune-r0c1", "finetune-r1c0", "finetune-r1c1"]


def test_preempted_batch_resumes_without_retraining_finished_candidates(env):
    """SIGKILL the run as soon as the first candidate of revision 0 is fine-tuned; `resume` completes the
    revision without training that candidate again, and every (revision, candidate) is recorded once."""
    base, tmp = env
    store_dir = tmp / "preempted"
    log = tmp / "preempted.log"
    with log.open("w") as f:
        run = subprocess.Popen([str(BIN / "agentic-pruner"), "run", *QUICK, "--store", str(store_dir),
                                "--max-train-batches", "20"], env=base, stdout=f, stderr=subprocess.STDOUT,
                               cwd=ROOT, start_new_session=True)
    finished: list[Path] = []
    deadline = time.time() + 600
    try:
        while not finished and time.time() < deadline:
            assert run.poll() is None, log.read_text()[-3000:]
            finished = sorted(store_dir.glob("*/revisions/r000*.evaluated.json"))
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert finished, "no candidate finished in time"
    finished = sorted(store_dir.glob("*/revisions/r000*.evaluated.json"))  # what exists after the kill
    run_id = finished[0].parts[-3]
    before = {p.name: p.read_bytes() for p in finished}
    resumed = subprocess.run([str(BIN / "agentic-pruner"), "resume", run_id, "--store", str(store_dir)], env=base,
                             capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    history = _check_history(str(store_dir), base)
    for name, data in before.items():  # the finished candidates' results were read back, not recomputed
        assert (store_dir / run_id / "revisions" / name).read_bytes() == data
        cand = int(name[5:].split(".")[0] or 0) if name[4] == "c" else 0
        rec = next(r for r in history if (r["revision"], r["candidate"]) == (0, cand))
        assert any(f":{run.pid} " in n for n in rec["proposal_notes"]), rec["proposal_notes"]  # the killed process
    assert any(str(run.pid) not in " ".join(r["proposal_notes"]) for r in history)  # the rest: the resumed one


def test_unreachable_dask_scheduler_is_one_line_error(env):
    base, tmp = env
    port = free_ports(1)[0]
    done = _run_cli(["--store", str(tmp / "never"), "--task-runner", f"dask://127.0.0.1:{port}"], base,
                    tmp / "bad.log", timeout=300)
    err = (tmp / "bad.log").read_text().strip().splitlines()[-1]
    assert done.returncode == 2 and err.startswith("error: cannot reach the cluster"), err
    assert RunConfig(task_runner="dask://h:1").task_runner == "dask://h:1"
    with pytest.raises(ValueError, match="unknown task runner"):
        RunConfig(task_runner="spark://h")
