"""Crash consistency by construction: kill the run after store write k, for every k (``CRASH_STRIDE=1``), then
resume.

The "kill" is injected into the store backend: write k completes, then every later store operation of
that run raises (as if the process had died right there, so nothing after it reaches the store, not
even a failed status or the lease's release), and the run's lease is left behind by a process that no
longer exists. Re-running the same configuration must finish with exactly the history, checkpoints and
final model of an uninterrupted run.
"""
import itertools
import os

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.agentic_prune import agentic_prune
from pruning.artifacts import LocalStore, RunLease, open_store, runs
from pruning.artifacts import lease as lease_module
from tasks import steps
from tasks.config import RunConfig

WRITES = ("_raw_put", "_raw_put_file", "_raw_delete", "_raw_create", "_raw_replace_if")
READS = ("_raw_get", "_raw_get_file", "_raw_exists", "_raw_list", "_raw_get_versioned")
DEAD_PID = 2 ** 22 + 17  # no such process: the lease of a killed run
#: Kill after writes 1, 1+STRIDE, 1+2*STRIDE, ... (and the last); ``CRASH_STRIDE=1`` tries every write (about
#: 46 kill points, ~10 min on 2 cores; the default keeps the suite's budget and still crosses every phase).
STRIDE = int(os.environ.get("CRASH_STRIDE", "6"))


class Killed(Exception):
    """The process died at this point (raised by every store operation after the kill)."""


class Fault:
    """Counts store writes; after ``kill_after`` of them the 'process' is dead."""

    def __init__(self):
        self.count, self.kill_after, self.dead = 0, None, False

    def arm(self, k: int | None) -> None:
        self.count, self.kill_after, self.dead = 0, k, False


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=90):  # one API for all the runs of this module
        yield


@pytest.fixture
def fault(monkeypatch):
    f = Fault()
    for name in WRITES + READS:
        original = getattr(LocalStore, name)

        def op(self, *args, _original=original, _write=name in WRITES, **kwargs):
            if f.dead:
                raise Killed("killed")
            out = _original(self, *args, **kwargs)
            if _write and f.kill_after is not None:
                f.count += 1
                if f.count == f.kill_after:
                    f.dead = True
            return out

        monkeypatch.setattr(LocalStore, name, op)
    init = RunLease.__init__

    def lease_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if f.kill_after is not None:
            self.pid = DEAD_PID  # the holder that will be killed is "another process" of this host
    monkeypatch.setattr(RunLease, "__init__", lease_init)
    real_alive = lease_module._pid_alive
    monkeypatch.setattr(lease_module, "_pid_alive", lambda pid: pid != DEAD_PID and real_alive(pid))
    return f


def _config(store) -> RunConfig:
    return RunConfig(store=str(store), max_revisions=2, extra_revisions=0, extended_epochs=1, latency=False,
                     max_train_batches=1, inline_epochs=1)


def _outcome(store_dir, run_id):
    store = open_store(str(store_dir))
    history = [(r["revision"], r["candidate"], r["status"], r["achieved_macs"], r["accuracy_after"],
                r["checkpoint_sha256"]) for r in runs.read_history(store, run_id)]
    final = store.get_json(runs.key(run_id, "final/model.json"))
    return history, final["sha256"], final["test_accuracy"]


def _run(config):
    steps._CONTEXTS.drop(config.shareable().with_fingerprints().resolved_run_id())  # a new process has no cache
    return agentic_prune(config)


def test_kill_after_every_store_write_then_resume(tmp_path, harness, fault):
    reference = _run(_config(tmp_path / "reference"))
    want = _outcome(tmp_path / "reference", reference.run_id)
    assert want[0], "the reference run recorded nothing"

    survived = []
    for k in itertools.count(1, STRIDE):
        store_dir = tmp_path / f"k{k}"
        fault.arm(k)
        try:
            _run(_config(store_dir))
        except Killed:
            pass
        else:
            break  # the run needs fewer than k writes: every kill point was tried
        assert fault.dead
        fault.arm(None)
        summary = _run(_config(store_dir))
        assert summary.best_revision is not None, f"kill after write {k}: resume found no candidate"
        assert _outcome(store_dir, summary.run_id) == want, f"kill after write {k}: resume differs"
        survived.append(k)
    assert len(survived) * STRIDE > 40  # the kill points spanned the whole run
