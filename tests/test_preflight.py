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
