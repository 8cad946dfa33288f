"""Everything knowable before the flow starts fails before it starts: one `error:` line, exit 2, nothing written."""
import json
import os
import socket
import time

import pytest
import torch
from PIL import Image

from agentic_pruner.cli import main

QUICK = ["--max-revisions", "1", "--extended-epochs", "0", "--no-latency", "--max-train-batches", "1"]


def _imagefolder(root, splits=("train", "val"), classes=("a", "b", "c"), images=True):
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            if images:
                Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "0.png")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files a user might pass: a text file, a 1000-class checkpoint, ImageFolders good and broken."""
    import timm

    d = tmp_path_factory.mktemp("inputs")
    (d / "notes.txt").write_text("not a checkpoint\n")
    torch.manual_seed(0)
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), d / "mnv3_1000.pt")
    _imagefolder(d / "three")
    _imagefolder(d / "noval", splits=("train",))
    (d / "empty").mkdir()
    _imagefolder(d / "noimages", images=False)
    return d


CASES = [
    (["--model", "nosuchmodel_xyz"], "unknown model 'nosuchmodel_xyz'"),
    (["--target-macs", "150%"], "strictly between 0% and 100%"),
    (["--target-macs", "0%"], "strictly between 0% and 100%"),
    (["--target-macs", "abc%"], "malformed relative target 'abc%'"),
    (["--target-macs", "abc"], "malformed MAC count 'abc'"),
    (["--model", "resnet18", "--checkpoint", "{d}/notes.txt"], "cannot read checkpoint"),
    (["--model", "mobilenetv3_small_075", "--checkpoint", "{d}/mnv3_1000.pt"], "does not fit the model"),
    (["--model", "mobilenetv3_small_050", "--checkpoint", "{d}/mnv3_1000.pt"],
     "has 10 classes but the model outputs 1000: use a checkpoint whose classifier has 10 outputs"),
    (["--model", "mobilenetv3_small_050", "--data", "imagefolder:{d}/three"],
     "has 3 classes but the model outputs 1000: pass --num-classes 3"),
    (["--model", "mobilenetv3_small_050", "--num-classes", "10", "--target-macs", "5G"], "is not below the model's"),
    (["--data", "imagefolder:{d}/missing"], "ImageFolder path does not exist"),
    (["--data", "imagefolder:{d}/empty"], "has no train/ folder"),
    (["--data", "imagefolder:{d}/noval"], "has no val/ folder"),
    (["--data", "imagefolder:{d}/noimages"], "contains no images"),
    (["--data", "imagefolder:{d}/three"], "embedded default model classifies the 10 digits"),
    (["--data", "csv:{d}/x"], "unknown data spec"),
    (["--strategist", "llm", "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--no-llm-fallback"],
     "LLM endpoint unreachable"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[f"{i}-{c[1][:24]}" for i, c in enumerate(CASES)])
def test_bad_run_input_fails_before_any_work(capsys, tmp_path, inputs, args, needle):
    store = tmp_path / "store"
    argv = ["run", "--store", str(store), *QUICK, *[a.format(d=inputs) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not store.exists(), f"something was written: {list(store.rglob('*'))}"


def test_a_busy_run_is_refused_before_any_work(capsys, tmp_path):
    """A live process holding the run's lease: the second command stops with one line and writes nothing."""
    from agentic_pruner.cli import _run_config, build_parser

    store = tmp_path / "store"
    argv = ["run", "--store", str(store), *QUICK]
    run_id = _run_config(build_parser().parse_args(argv)).shareable().with_fingerprints().resolved_run_id()
    lease = store / run_id / "lease.json"
    lease.parent.mkdir(parents=True)
    now = time.time()
    lease.write_text(json.dumps({"owner": "someone", "host": socket.gethostname(), "pid": os.getppid(),
                                 "acquired": "2026-01-01T00:00:00+00:00", "renewed": now, "expires": now + 60}))
    before = sorted(p.name for p in store.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"run {run_id} is already running" in err[-1]
    assert sorted(p.name for p in store.rglob("*")) == before


def test_a_changed_checkpoint_or_data_is_a_new_run_never_a_stale_resume(tmp_path, inputs):
    import shutil

    from pruning.errors import UserError
    from tasks import steps
    from tasks.config import RunConfig

    ck = tmp_path / "w.pt"
    shutil.copy(inputs / "mnv3_1000.pt", ck)
    data = tmp_path / "data"
    shutil.copytree(inputs / "three", data)
    cfg = RunConfig(model="mobilenetv3_small_050", checkpoint=str(ck), num_classes=None,
                    data=f"imagefolder:{data}", store=str(tmp_path / "store"))
    first = cfg.with_fingerprints()
    assert first.checkpoint_sha256 and first.data_fingerprint
    assert cfg.with_fingerprints().resolved_run_id() == first.resolved_run_id()  # same inputs, same run

    sd = torch.load(ck, weights_only=True)
    sd["classifier.bias"] = sd["classifier.bias"] + 1
    torch.save(sd, ck)
    changed = cfg.with_fingerprints()
    assert changed.resolved_run_id() != first.resolved_run_id()

    Image.new("RGB", (8, 8)).save(data / "train" / "a" / "1.png")
    assert cfg.with_fingerprints().data_fingerprint != changed.data_fingerprint

    steps.open_run(first.model_copy(update={"run_id": "pinned"}))  # `resume pinned` on changed inputs:
    with pytest.raises(UserError, match="the checkpoint file changed since run pinned started"):
        steps.open_run(changed.model_copy(update={"run_id": "pinned"}))


def test_model_not_served_fails_before_any_work_without_fallback(capsys, tmp_path):
    from llm_server import ScriptedLLMServer

    store = tmp_path / "store"
    with ScriptedLLMServer(models=["other-model"]) as srv:
        rc = main(["run", "--store", str(store), *QUICK, "--strategist", "llm", "--llm-base-url", srv.base_url,
                   "--llm-model", "wanted", "--no-llm-fallback"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "'wanted' is not served" in err[-1] and not store.exists()


def test_credentials_in_the_llm_url_are_never_stored(monkeypatch, tmp_path):
    from agentic_pruner.cli import _run_config, build_parser
    from agents.llm_client import LLMConfig, LLMUnavailable

    monkeypatch.delenv("AGENTIC_PRUNER_LLM_BASE_URL", raising=False)
    url = "http://user:sk-very-secret@127.0.0.1:9/v1"
    args = build_parser().parse_args(["run", "--store", str(tmp_path), "--strategist", "llm", "--llm-base-url", url,
                                      "--llm-model", "m"])
    config = _run_config(args)
    assert "sk-very-secret" not in config.model_dump_json()  # config.json and the flow run's parameters
    assert config.llm_base_url == "http://***@127.0.0.1:9/v1"
    assert LLMConfig.for_endpoint(config.llm_base_url, "m").base_url == url  # this process still has it
    monkeypatch.delenv("AGENTIC_PRUNER_LLM_BASE_URL")
    with pytest.raises(LLMUnavailable, match="AGENTIC_PRUNER_LLM_BASE_URL"):  # a worker without it: one line
        LLMConfig.for_endpoint(config.llm_base_url, "m")


@pytest.mark.parametrize("argv,needle", [
    (["solve", "--model", "resnet18", "--target-macs", "1G", "--save", "{tmp}"], "is a directory"),
    (["profile", "--model", "resnet18", "--csv-dir", "{tmp}/file"], "is a file, not a directory"),
    (["search", "--model", "resnet18", "--target-macs", "1G", "--out", "{tmp}"], "is a directory"),
])
def test_output_paths_are_checked_before_any_work(capsys, tmp_path, argv, needle):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as done:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
