"""`agentic-pruner search`: the agent loop on CPU without Prefect (proxy evaluation), and its user errors."""
import json
import socket

import pytest

from agentic_pruner.cli import main
from agents.history import from_jsonl

SMALL = ["--model", "resnet18", "--num-classes", "10", "--input-size", "32"]


def test_search_json_history_and_progress(capsys, tmp_path):
    out = tmp_path / "runs" / "history.jsonl"
    rc = main(["search", *SMALL, "--target-macs", "0.02G", "--max-revisions", "3", "--eval-samples", "16",
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    records = from_jsonl(out)
    assert 1 <= len(records) <= 3 and [r.revision for r in records] == list(range(len(records)))
    assert records[0].in_band and records[0].status == "ok" and records[0].move == "initial"
    assert all(r.accuracy_before is not None and 0 <= r.accuracy_before <= 1 for r in records)
    assert data["first_in_band_revision"] == 0 and data["best_in_band"] is True
    assert data["baseline_proxy_accuracy"] == 1.0 and len(data["history"]) == len(records)
    best = records[data["best_revision"]]
    assert data["best"]["achieved_macs"] == best.achieved_macs and 0.017e9 <= best.achieved_macs <= 0.021e9
    progress = [line for line in captured.err.splitlines() if line.startswith("revision ")]
    assert len(progress) == len(records)
    assert "strategist heuristic" in progress[0] and "in band" in progress[0] and "proxy acc" in progress[0]


def test_search_table(capsys):
    assert main(["search", *SMALL, "--target-macs", "20M", "--max-revisions", "1", "--eval-samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "proxy_acc" in out and "selected revision 0" in out and "stop: maximum revisions reached (1)" in out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnt18", "--target-macs", "1G"], "unknown model 'resnt18'"),
    ([*SMALL, "--target-macs", "2.0X"], "malformed MAC count"),
    ([*SMALL, "--target-macs", "5G"], "not below"),
    ([*SMALL, "--target-macs", "0.02G", "--max-revisions", "0"], "--max-revisions"),
    ([*SMALL, "--target-macs", "0.02G", "--strategist", "llm", "--llm-base-url", "http://127.0.0.1:{port}/v1",
      "--llm-model", "m", "--no-llm-fallback"], "LLM endpoint unreachable: cannot connect to http://127.0.0.1:{port}"),
])
def test_search_bad_input_one_line_exit_2(capsys, argv, needle):
    port = _closed_port()
    argv = [a.format(port=port) for a in argv]
    assert main(["search", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle.format(port=port) in err[-1], err
    assert sum(line.startswith("error: ") for line in err) == 1
    assert not any("Traceback" in line for line in err)
