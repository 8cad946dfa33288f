"""The store's crash-safe checksum order, its conditional writes, and the run lease built on them."""
import io
import json
import os
import threading
import time

import pytest
import torch
from s3_server import seaweed_s3

from pruning.artifacts import ChecksumMismatch, LeaseLost, RunBusy, RunLease, StoreError, open_store, runs
from pruning.artifacts.base import SIDECAR_SUFFIX


@pytest.fixture(scope="module")
def s3():
    with seaweed_s3() as server:
        server.create_bucket("lease-test")
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://lease-test/{tmp_path.name}", endpoint_url=s3.endpoint, **s3.credentials)


class Crash(Exception):
    pass


def _crash_on_write(store, n: int):
    """Let ``n`` raw writes through, then crash (the process dies before the next one)."""
    real = store._raw_put
    left = [n]

    def put(key, data):
        if left[0] == 0:
            raise Crash(key)
        left[0] -= 1
        return real(key, data)
    store._raw_put = put
    return real


@pytest.mark.parametrize("writes_before_crash", [1, 2])
def test_a_crash_between_object_and_sidecar_leaves_a_readable_key(store, writes_before_crash):
    """Overwrite = pending sidecar, object, final sidecar: a crash after either of the first two leaves the old
    or the new content, both verified; nothing reads as corrupted."""
    store.put_bytes("r/history.jsonl", b"old\n")
    real = _crash_on_write(store, writes_before_crash)
    with pytest.raises(Crash):
        store.put_bytes("r/history.jsonl", b"old\nnew\n")
    store._raw_put = real
    expected = b"old\n" if writes_before_crash == 1 else b"old\nnew\n"
    assert store.get_bytes("r/history.jsonl") == expected
    store.put_bytes("r/history.jsonl", b"next\n")  # the next write settles the sidecar to one digest
    assert store.get_bytes("r/history.jsonl") == b"next\n"
    assert len(store._raw_get("r/history.jsonl" + SIDECAR_SUFFIX).splitlines()) == 1


def test_a_new_key_crashed_before_its_object_does_not_exist(store):
    real = _crash_on_write(store, 1)
    with pytest.raises(Crash):
        store.put_json("r/new.json", {"a": 1})
    store._raw_put = real
    assert not store.exists("r/new.json") and "r/new.json.sha256" not in store.list("r/")


def test_flipped_bytes_and_a_deleted_sidecar_are_refused(store):
    store.put_bytes("r/h.jsonl", b'{"a": 1}\n')
    store._raw_put("r/h.jsonl", b'{"a": 2}\n')
    with pytest.raises(ChecksumMismatch, match="corrupted or modified"):
        store.get_bytes("r/h.jsonl")
    store._raw_delete("r/h.jsonl" + SIDECAR_SUFFIX)
    with pytest.raises(ChecksumMismatch, match="no checksum sidecar"):
        store.get_bytes("r/h.jsonl")


def test_a_pickle_with_code_is_refused_with_a_whole_sentence(store):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": Evil()}, buf)
    store.put_bytes("r/evil.pt", buf.getvalue())
    with pytest.raises(StoreError) as err:
        store.get_torch("r/evil.pt")
    msg = str(err.value)
    assert "never unpickled" in msg and msg.endswith("torch.save(model.state_dict(), path)") and "\n" not in msg


def test_conditional_writes(store):
    assert store.create_if_absent("r/lock", b"a") is True
    assert store.create_if_absent("r/lock", b"b") is False
    data, version = store.read_versioned("r/lock")
    assert data == b"a"
    assert store.replace_if("r/lock", b"c", version) is True
    assert store.replace_if("r/lock", b"d", version) is False  # somebody changed it since
    assert store.read_versioned("r/lock")[0] == b"c"


def test_exactly_one_of_many_racing_creators_wins(store):
    wins = []
    barrier = threading.Barrier(8)

    def race(i):
        barrier.wait()
        if store.create_if_absent("r/race", str(i).encode()):
            wins.append(i)
    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and store.read_versioned("r/race")[0] == str(wins[0]).encode()


def test_lease_busy_release_and_takeover(store):
    with RunLease(store, "run-a", ttl_s=30, heartbeat_s=0.2) as first:
        with pytest.raises(RunBusy, match="run run-a is already running"):
            RunLease(store, "run-a").acquire()
        time.sleep(0.6)
        assert first.holder().renewed > time.time() - 1  # the heartbeat renews it
        first.check()
    assert first.holder().released
    with RunLease(store, "run-a"):  # released: the next run takes it at once
        pass


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store):
    lease = RunLease(store, "run-b")
    now = time.time()
    dead = {"owner": "x", "host": lease.host, "pid": 2 ** 22 + 11, "acquired": "t", "renewed": now,
            "expires": now + 600}
    store.create_if_absent("run-b/lease.json", json.dumps(dead).encode())
    lease.acquire()
    assert lease.holder().owner == lease.owner


def test_a_silent_holder_on_another_host_is_waited_out(store):
    now = time.time()
    silent = {"owner": "x", "host": "elsewhere", "pid": 1, "acquired": "t", "renewed": now - 100, "expires": now + 1.5}
    store.create_if_absent("run-c/lease.json", json.dumps(silent).encode())
    t = time.time()
    lease = RunLease(store, "run-c", heartbeat_s=1).acquire()
    assert 1.0 < time.time() - t < 10 and lease.holder().owner == lease.owner


def test_a_stalled_holder_learns_it_was_taken_over(store):
    first = RunLease(store, "run-d", ttl_s=0.5, heartbeat_s=60).acquire()
    time.sleep(0.8)  # stalled past its expiry (no heartbeat thread here)
    second = RunLease(store, "run-d", heartbeat_s=60).acquire()
    first.renew()
    with pytest.raises(LeaseLost, match="taken over"):
        first.check()
    second.release()


def test_runs_shows_a_dead_run_as_interrupted(store):
    store.put_json("run-e/config.json", {})
    runs.write_status(store, "run-e", state="running")
    now = time.time()
    store.create_if_absent("run-e/lease.json", json.dumps(
        {"owner": "x", "host": "elsewhere", "pid": 1, "acquired": "t", "renewed": now - 500, "expires": now - 400}
    ).encode())
    assert [r["state"] for r in runs.list_runs(store)] == ["interrupted"]
