"""CLI: one-line errors with exit code 2 for bad input; JSON output of solve."""
import json

import pytest

from agentic_pruner.cli import main
from pruning.units import parse_macs


@pytest.mark.parametrize("argv,needle", [
    (["solve", "--model", "resnt18", "--target-macs", "1G"], "unknown model 'resnt18'"),
    (["solve", "--model", "resnet18", "--target-macs", "2.0X"], "malformed MAC count"),
    (["solve", "--model", "resnet18", "--target-macs", "0"], "must be positive"),
    (["solve", "--model", "resnet18", "--num-classes", "10", "--input-size", "32", "--target-macs", "5G"], "not below"),
    (["solve", "--model", "resnet18", "--target-macs", "1G", "--checkpoint", "/nonexistent.pt"], "checkpoint not found"),
    (["solve", "--model", "resnet18", "--target-macs", "1G", "--stage-mult", "layer1"], "NAME=NUMBER"),
    (["profile", "--model", "not_a_model_at_all"], "unknown model"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_parse_macs():
    assert parse_macs("2.06G") == pytest.approx(2.06e9)
    assert parse_macs("500M") == 5e8
    assert parse_macs("1.5e9") == 1.5e9
    for bad in ["", "G", "-1G", "2.0X", "1..2G"]:
        with pytest.raises(ValueError):
            parse_macs(bad)


def test_solve_json(capsys, tmp_path):
    out = tmp_path / "p.pt"
    rc = main(["solve", "--model", "resnet18", "--num-classes", "10", "--input-size", "32",
               "--target-macs", "0.02G", "--overshoot", "1", "--undershoot", "10", "--json", "--save", str(out)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["in_band"] is True
    for key in ("model", "base_macs", "target_macs", "achieved_macs", "error_pct", "in_band", "probes", "seconds"):
        assert key in data
    assert data["achieved_macs"] <= 0.02e9 * 1.01 and data["real_prunes"] == 1
    assert out.is_file()


def test_profile_json(capsys):
    assert main(["profile", "--model", "resnet18", "--num-classes", "10", "--input-size", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs"] == pytest.approx(sum(l["macs"] for l in data["layers"]))
    assert {s["stage"] for s in data["stages"]} >= {"layer1", "layer4"}


def test_a_bug_is_exit_1_with_the_traceback_in_a_file(capsys, monkeypatch):
    """A plain ValueError from deep inside is a bug, not the user's input: exit 1, one line, traceback saved."""
    import pruning.engine

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch deep inside")

    monkeypatch.setattr(pruning.engine, "prune_to_target", broken)
    argv = ["solve", "--model", "resnet18", "--num-classes", "10", "--input-size", "32", "--target-macs", "0.02G"]
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: internal error (ValueError: shape mismatch deep inside)") and "bug" in last
    path = last.rsplit("Traceback written to ", 1)[1]
    text = open(path).read()
    assert "Traceback" in text and "broken" in text
    with pytest.raises(ValueError, match="shape mismatch"):  # --debug anywhere on the line: the real traceback
        main([*argv, "--debug"])


def test_user_errors_are_one_family():
    from agentic_pruner._args import CliError
    from agents.strategists import LLMUnavailable
    from pruning.artifacts import StoreError
    from pruning.errors import UserError
    from pruning.models import ModelLoadError
    from pruning.solver import InfeasibleTarget
    from pruning.train.data import DataError
    from tasks.runners import RunnerUnavailable

    for cls in (StoreError, ModelLoadError, InfeasibleTarget, DataError, RunnerUnavailable, CliError, LLMUnavailable):
        assert issubclass(cls, UserError), cls
