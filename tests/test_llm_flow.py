"""The LLM pruning flow: store layout, resume from the last persisted iteration, CLI command."""
import argparse
import json

import pytest
from prefect.testing.utilities import prefect_test_harness
from test_llm_pruning import TEST_DATA, TEST_TINY, shared_cache_dir

from agentic_pruner import llm_cli
from agentic_pruner.cli import CliError
from agents.llm_pruning import HeuristicPruneStrategist, run_prune_agent
from pruning.artifacts import open_store, runs
from pruning.llm.session import PruneSession
from pruning.llm.tiny_model import train_tiny_model
from tasks.config import LLMRunConfig

pytestmark = pytest.mark.slow

TINY = dict(hidden_size=TEST_TINY.hidden_size, num_layers=TEST_TINY.num_layers, num_heads=TEST_TINY.num_heads,
            num_kv_heads=TEST_TINY.num_kv_heads, intermediate_size=TEST_TINY.intermediate_size,
            seq_len=TEST_TINY.seq_len, batch_size=TEST_TINY.batch_size, steps=TEST_TINY.steps, lr=TEST_TINY.lr,
            warmup=TEST_TINY.warmup, eval_tokens=TEST_TINY.eval_tokens)
QUICK = dict(tiny=TINY, target_sparsity=0.3, calib_sequences=TEST_DATA.calib_sequences,
             grad_sequences=TEST_DATA.grad_sequences, eval_tokens=TEST_DATA.eval_tokens)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = shared_cache_dir(tmp_path_factory)  # shared with test_llm_pruning: the model is trained once
    train_tiny_model(TEST_TINY, path)
    return path


@pytest.fixture(scope="module")
def flow_fn(cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTIC_PRUNER_CACHE", str(cache.parent))  # the flow finds the tiny model in $AGENTIC_PRUNER_CACHE/llm/
    with prefect_test_harness(server_startup_timeout=90):
        from flows.llm_prune import llm_prune

        yield llm_prune
    mp.undo()


def test_flow_persists_and_resumes_from_last_iteration(flow_fn, tmp_path, cache):
    store_url = str(tmp_path / "store")
    cfg = LLMRunConfig(store=store_url, run_id="llm-resume", max_iterations=3, **QUICK)
    first = flow_fn(cfg)  # "preempted" after 3 iterations
    assert first.stop_reason == "max-iterations" and not first.reached and first.iterations == 3
    store = open_store(store_url)
    hist = runs.read_history(store, "llm-resume")
    assert [r["iteration"] for r in hist] == [0, 1, 2]
    for r in hist:
        assert (r["step_key"] is not None) == r["accepted"]
        if r["accepted"]:
            assert store.exists(r["step_key"])
    for name in ("config.json", "status.json", "model.json", "profile.json", "final/summary.md"):
        assert store.exists(runs.key("llm-resume", name)), name
    # on this machine (no --device: auto) everything ran on the CPU in fp32, and the records say so
    assert (first.device, first.dtype, first.peak_memory_gib) == ("cpu", "float32", None)
    info = store.get_json(runs.key("llm-resume", "model.json"))
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert all(r["device"] == "cpu" for r in hist)

    resumed = flow_fn(cfg.model_copy(update={"max_iterations": 80}))
    assert resumed.resumed_iterations == 3 and resumed.new_iterations == resumed.iterations - 3
    assert resumed.reached and abs(resumed.final_sparsity - 0.3) < 0.005
    hist = runs.read_history(store, "llm-resume")
    assert [r["iteration"] for r in hist] == list(range(resumed.iterations))
    assert runs.read_status(store, "llm-resume")["state"] == "completed"

    # the resumed run ends exactly where an uninterrupted plain-Python run ends (deterministic, exact replay)
    sess = PruneSession.embedded(TEST_TINY, TEST_DATA, cache_dir=cache)
    plain = run_prune_agent(sess, HeuristicPruneStrategist(), cfg.prune_config().model_copy(update={"max_iterations": 80}))
    assert store.get_json(runs.key("llm-resume", "final/layers.json")) == pytest.approx(plain.layer_sparsities)
    assert resumed.final_val_ppl == pytest.approx(plain.final_ppl, rel=1e-6)

    again = flow_fn(cfg.model_copy(update={"max_iterations": 80}))
    assert again.new_iterations == 0 and again.resumed_iterations == resumed.iterations

    with pytest.raises(ValueError, match="different configuration"):
        flow_fn(cfg.model_copy(update={"target_sparsity": 0.4}))


def test_run_keeps_its_dtype_when_resumed_elsewhere(flow_fn, tmp_path, monkeypatch):
    """A run started in bf16 (what a GPU with native bf16 picks) resumes in bf16 on a machine that would pick
    fp32: same fingerprint, exact replay; ``device`` is not part of the run's identity."""
    import torch

    from tasks import llm_steps

    store_url = str(tmp_path / "store")
    cfg = LLMRunConfig(store=store_url, run_id="llm-dtype", max_iterations=2, **QUICK)
    with monkeypatch.context() as mp:
        mp.setattr(llm_steps, "llm_dtype", lambda device: torch.bfloat16)
        first = flow_fn(cfg)
    assert first.dtype == "bfloat16" and first.iterations == 2
    resumed = flow_fn(cfg.model_copy(update={"max_iterations": 3, "device": "cpu"}))
    assert resumed.dtype == "bfloat16" and resumed.resumed_iterations == 2 and resumed.iterations == 3
    assert open_store(store_url).get_json(runs.key("llm-dtype", "model.json"))["dtype"] == "bfloat16"


def _parser():
    parser = argparse.ArgumentParser(prog="agentic-pruner")
    llm_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_llm_on_a_local_model_dir(flow_fn, tmp_path, cache, capsys):
    model_dir = cache / TEST_TINY.key()
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("\n".join(json.dumps({"question": f"Q{i}", "choices": ["Return the value.", "zq#x!vv@"],
                                         "answer": 0}) for i in range(3)) + "\n")
    args = _parser().parse_args(["llm", "--model-path", str(model_dir), "--target-sparsity", "0.2", "--store",
                                 str(tmp_path / "store"), "--eval-tokens", "2048", "--calib-sequences", "8",
                                 "--mcq", str(mcq), "--save", str(tmp_path / "pruned"), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reached"] and out["mcq_before"] is not None and out["mcq_after"] is not None
    assert (tmp_path / "pruned" / "config.json").is_file()
    from pruning.llm.masks import MaskedModel
    from pruning.llm.tiny_model import load_causal_lm

    model, tok = load_causal_lm(tmp_path / "pruned")
    assert MaskedModel(model).zero_fraction() == pytest.approx(out["final_sparsity"], abs=1e-3)


@pytest.mark.parametrize("argv, msg", [
    (["--model-path", "/nonexistent/model", "--target-sparsity", "0.4"], "model directory not found"),
    (["--target-sparsity", "0.6", "--nm", "2:4"], "exceeds"),
    (["--target-sparsity", "1.2"], "must lie in"),
    (["--target-sparsity", "0.4", "--strategist", "llm"], "--llm-model"),
])
def test_cli_llm_user_errors(argv, msg, monkeypatch):
    monkeypatch.delenv("AGENTIC_PRUNER_LLM_MODEL", raising=False)
    args = _parser().parse_args(["llm", *argv])
    with pytest.raises(CliError, match=msg):
        args.func(args)
