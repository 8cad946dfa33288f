"""Latency solver: search the plan scale on measured onnxruntime CPU latency.

Small model (resnet18, 10 classes, 64x64), one onnxruntime thread (less sensitive to a busy machine),
few runs; the only latency assertion is "<= budget as measured by the solver itself" (shared, noisy CPU).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from agentic_pruner.cli import main
from pruning.latency_search import (
    DEFAULT_ROUND_TO,
    LatencyInfeasible,
    LatencyTargetError,
    OrtTimer,
    export_for_timing,
    prune_to_latency,
    solve_latency,
)
from pruning.plan import PruningPlan
from pruning.solver import MacBand, solve
from pruning.space import PruningError, PruningSpace, count_macs_params, example_input

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def example():
    return example_input(SIZE)


@pytest.fixture(scope="module")
def space(model, example):
    """Analysed once; tests cut copies of it (``pruned_copy``) and never the space itself."""
    return PruningSpace.build(model, example, PruningPlan())


@pytest.fixture(scope="module")
def base_ms(model, tmp_path_factory) -> float:
    """Median bs-8 latency of the unpruned model, measured the way the solver measures."""
    exp = export_for_timing(model, (3, SIZE, SIZE), tmp_path_factory.mktemp("base") / "base.onnx")
    return OrtTimer(exp.path, 8, 1, 3).measure(15).median_ms


def test_pruned_copy_is_exact_and_leaves_space_unapplied(model, example):
    space = PruningSpace.build(model, example, PruningPlan())  # cut at the end: not the shared fixture
    sol = solve(space, PruningPlan(), MacBand(target_macs=space.base_macs * 0.5))
    pruned = space.pruned_copy(sol.cuts())
    macs, _ = count_macs_params(pruned, example)
    assert macs == sol.predicted_macs
    # the space is untouched and can still be cut (once), to the same shapes
    assert not getattr(space, "_applied", False) and space.pruning_history() == []
    assert sum(p.numel() for p in space.model.parameters()) == sum(p.numel() for p in model.parameters())
    again = space.apply(sol.cuts())
    assert count_macs_params(again, example)[0] == sol.predicted_macs
    assert [p.shape for p in again.parameters()] == [p.shape for p in pruned.parameters()]
    with pytest.raises(PruningError):
        space.pruned_copy(sol.cuts())


def test_latency_search_meets_generous_budget(model, example, base_ms):
    budget = 0.7 * base_ms
    pruned, result, _ = prune_to_latency(model, example, PruningPlan(), budget, runs=12, max_probes=8, threads=1)
    sol = result.solution
    assert sol.met and sol.achieved_ms <= budget
    assert sol.measured_probes <= 8 and len(sol.probes) >= 2 and sol.probes[0].verdict == "base"
    assert all(p.macs < sol.base_macs for p in sol.probes[1:])
    assert sol.round_to == DEFAULT_ROUND_TO["ort-cpu"]
    assert result.prediction_exact and result.achieved_macs == sol.macs
    assert count_macs_params(pruned, example)[0] == sol.macs
    # the original model is untouched
    assert count_macs_params(model, example)[0] == sol.base_macs


def test_impossible_budgets_are_one_line_errors(space):
    with pytest.raises(LatencyInfeasible, match="not below the unpruned"):
        solve_latency(space, PruningPlan(), target_ms=1e6, runs=3, threads=1)
    with pytest.raises(LatencyInfeasible, match="below what the safety limits can reach") as info:
        solve_latency(space, PruningPlan(), target_ms=1e-3, runs=3, threads=1)
    assert "\n" not in str(info.value)
    with pytest.raises(LatencyTargetError, match="unknown latency backend"):
        solve_latency(space, PruningPlan(), target_ms=1.0, backend="tpu")
    assert not getattr(space, "_applied", False)


@pytest.mark.parametrize("argv,needle", [
    (["--target-macs", "0.05G", "--target-latency-ms", "5"], "exactly one of --target-macs and --target-latency-ms"),
    ([], "exactly one of --target-macs and --target-latency-ms"),
    (["--target-latency-ms", "-1"], "must be positive"),
])
def test_cli_target_flags(capsys, argv, needle):
    rc = main(["solve", "--model", "resnet18", "--num-classes", "10", "--input-size", str(SIZE), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1]


def test_cli_latency_json(capsys, base_ms, tmp_path):
    budget = 0.7 * base_ms
    out = tmp_path / "p.pt"
    rc = main(["solve", "--model", "resnet18", "--num-classes", "10", "--input-size", str(SIZE),
               "--target-latency-ms", f"{budget:.3f}", "--latency-backend", "ort-cpu", "--batch-size", "8",
               "--latency-runs", "10", "--threads", "1", "--json", "--save", str(out)])
    data = json.loads(capsys.readouterr().out)
    assert rc in (0, 1)  # 1 = met but below the -10 % band (noise); never over budget
    assert data["met"] and data["achieved_latency_ms"] <= data["target_latency_ms"]
    assert data["measured_probes"] <= 8 and data["probes"][0]["verdict"] == "base"
    for key in ("target_latency_ms", "achieved_latency_ms", "base_latency_ms", "achieved_macs", "probes",
                "round_to", "batch_size"):
        assert key in data
    assert {"mac_target", "macs", "median_ms", "p90_ms"} <= set(data["probes"][1])
    assert data["round_to"] == DEFAULT_ROUND_TO["ort-cpu"] and data["prediction_exact"]
    assert out.is_file()
