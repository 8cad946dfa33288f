"""LLM strategist against a real loopback OpenAI-compatible HTTP server (tests/llm_server.py); no mocks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from llm_server import Reply, ScriptedLLMServer

from agents.history import from_jsonl, to_jsonl
from agents.master import MasterAgent
from agents.safety import SafetyValidator
from agents.search import SearchContext, run_search
from agents.strategists import LLMConfig, LLMStrategist, LLMUnavailable, create_strategist, list_strategists
from pruning.solver import MacBand
from pruning.space import count_macs_params, example_input
from tasks.memory_steps import search_steps

KEY = "sk-test-SECRET-4f9a2c"

VALID_CNN = {"importance_criterion": "l1norm", "channel_pruning_ratio": 0.35, "round_to": 8, "global_pruning": True,
             "kind_multipliers": {"internal": 1.0, "residual": 0.4}, "stage_multipliers": {"layer1": 0.5, "layer4": 1.2},
             "baseline_mac": 0.037, "target_mac": 0.022, "expected_achieved_mac": 0.022, "rationale": "protect residual"}


def _engine(model_name: str, **kw):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, **kw).eval()
    ex = example_input(32)
    base, _ = count_macs_params(model, ex)
    band = MacBand(target_macs=base * 0.6)
    bridge = search_steps(model, ex, band)
    profile = bridge.profile(model_name=model_name, dataset="cifar10", num_classes=10)
    return bridge, SearchContext(band=band, profile=profile)


@pytest.fixture(scope="module")
def cnn():
    return _engine("test_resnet")


@pytest.fixture(scope="module")
def vit():
    return _engine("vit_tiny_patch16_224", img_size=32, depth=2)


@pytest.fixture
def server():
    with ScriptedLLMServer(models=["test-model"]) as srv:
        yield srv


def llm(srv: ScriptedLLMServer, **kw) -> LLMStrategist:
    cfg = dict(base_url=srv.base_url, model="test-model", timeout=2.0, http_retries=0)
    cfg.update(kw)
    return LLMStrategist(LLMConfig(**cfg))


def search(engine, strategist, revisions=1, **kw):
    bridge, ctx = engine
    return run_search(ctx, strategist, SafetyValidator(), MasterAgent(max_revisions=revisions, extra_revisions=10),
                      bridge.prune_and_measure, **kw)


def last_user_message(req) -> str:
    return [m for m in req.body["messages"] if m["role"] == "user"][-1]["content"]


# ------------------------------------------------------------------------------------------------
def test_registry_and_no_key_needed(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert {"heuristic", "llm"} <= set(list_strategists())
    s = create_strategist("llm", config=LLMConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    assert s.config.api_key is None  # constructing without a key never fails
    with pytest.raises(ValueError, match="unknown strategist"):
        create_strategist("oracle")


def test_plain_json_reply_is_used(server, cnn):
    server.push(Reply.json(VALID_CNN))
    res = search(cnn, llm(server))
    r = res.history[0]
    assert r.strategist == "llm" and r.strategist_used == "llm" and r.fallback_reason is None
    assert r.plan.importance == "l1" and r.plan.kind_multipliers == {"internal": 1.0, "residual": 0.4}
    assert r.plan.stage_multipliers == {"layer1": 0.5, "layer4": 1.2} and r.in_band
    assert json.loads(r.raw_reply) == VALID_CNN
    [req] = server.chat_requests()
    body = req.body
    assert body["model"] == "test-model" and body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    prompt = last_user_message(req)
    for needle in ("PRUNING HISTORY", "MASTER AGENT GUIDANCE", "Target MACs", "layer1, layer2, layer3, layer4"):
        assert needle in prompt
    assert "importance_criterion" in body["messages"][0]["content"]  # the JSON schema is in the system prompt


@pytest.mark.parametrize("wrap", [
    lambda j: f"After careful analysis of the MAC budget, here is my strategy: {j} Let me know!",
    lambda j: f"Sure.\n```json\n{j}\n```\nThis keeps residual channels safe.",
])
def test_prose_and_fenced_json_are_extracted(server, cnn, wrap):
    server.push(Reply.text(wrap(json.dumps(VALID_CNN))))
    r = search(cnn, llm(server)).history[0]
    assert r.strategist_used == "llm" and r.fallback_reason is None and r.plan.importance == "l1"
    assert len(server.chat_requests()) == 1


def test_schema_violation_is_sent_back_then_corrected(server, cnn):
    bad = {"importance_criterion": "entropy", "round_to": 3, "kind_multipliers": {"internal": -1}}
    server.push(Reply.json(bad), Reply.json(VALID_CNN))
    r = search(cnn, llm(server)).history[0]
    assert r.strategist_used == "llm" and r.fallback_reason is None
    assert any("attempt 1: schema validation failed" in n for n in r.proposal_notes)
    first, second = server.chat_requests()
    reask = last_user_message(second)
    assert "could not be used" in reask
    for needle in ("importance_criterion", "'entropy'" if "'entropy'" in reask else "entropy", "round_to"):
        assert needle in reask
    assert second.body["messages"][-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert "entropy" in r.raw_reply and "l1norm" in r.raw_reply  # both replies are kept


def test_unknown_stage_is_a_validation_error_too(server, cnn):
    wrong = dict(VALID_CNN, stage_multipliers={"stage9": 1.0})
    server.push(Reply.json(wrong), Reply.json(VALID_CNN))
    r = search(cnn, llm(server)).history[0]
    assert r.fallback_reason is None
    assert "unknown stage names ['stage9']" in last_user_message(server.chat_requests()[1])


def test_persistently_invalid_output_falls_back_to_heuristic(server, cnn):
    server.push(Reply.text("I think you should prune 50% of everything."),
                Reply.text("```python\nopen('/tmp/agentic_pruner_pwned', 'w').write('x')\n```"),
                Reply.json({"importance_criterion": "l2", "round_to": 7}))
    r = search(cnn, llm(server, max_retries=2)).history[0]
    assert len(server.chat_requests()) == 3
    assert r.strategist == "llm" and r.strategist_used == "heuristic"
    assert r.fallback_reason.startswith("invalid LLM output after 3 attempts")
    assert "round_to" in r.fallback_reason
    assert "prune 50%" in r.raw_reply and r.in_band and r.move == "initial"
    assert not Path("/tmp/agentic_pruner_pwned").exists()  # LLM output is parsed, never executed


def test_unsafe_vit_strategy_is_clamped(server, vit):
    unsafe = {"importance_criterion": "taylor", "round_to": 4, "global_pruning": True,
              "isomorphic_group_ratios": {"mlp_multiplier": 0.4, "qkv_multiplier": 0.95, "proj_multiplier": 0.2,
                                          "head_multiplier": 0.3}, "rationale": "aggressive"}
    server.push(Reply.json(unsafe))
    r = search(vit, llm(server)).history[0]
    assert r.strategist_used == "llm" and r.fallback_reason is None
    assert r.verdict == "clamped"
    text = " | ".join(r.verdict_reasons)
    for needle in ("qkv multiplier 0.95", "head multiplier", "proj multiplier", "round_to 4", "taylor"):
        assert needle in text, needle
    km = r.plan.kind_multipliers
    assert km["qkv"] <= km["mlp"] and km["head"] == 0 and km["proj"] == 0 and r.plan.round_to == 8
    assert r.proposed_plan.kind_multipliers["qkv"] == 0.95  # the unsafe original is kept for the audit
    assert r.status == "ok" and r.kind_ratios["qkv"] <= 0.85 and r.in_band


def test_http_500_is_retried_by_client_then_falls_back(server, cnn):
    server.push(Reply.error(500, "upstream exploded"), Reply.error(500, "upstream exploded"))
    r = search(cnn, llm(server, http_retries=1)).history[0]
    assert len(server.chat_requests()) == 2  # one client retry
    assert r.strategist_used == "heuristic" and "HTTP 500" in r.fallback_reason and r.in_band


def test_timeout_falls_back(server, cnn):
    server.push(Reply.sleep(3.0, json.dumps(VALID_CNN)))
    r = search(cnn, llm(server, timeout=0.5)).history[0]
    assert r.strategist_used == "heuristic" and "timed out" in r.fallback_reason


def test_response_format_rejected_is_retried_without_it(cnn):
    with ScriptedLLMServer(reject_response_format=True) as srv:
        srv.push(Reply.json(VALID_CNN), Reply.json(dict(VALID_CNN, importance_criterion="l2")))
        res = search(cnn, llm(srv), revisions=2)
        reqs = srv.chat_requests()
    assert ["response_format" in q.body for q in reqs] == [True, False, False]  # remembered for later revisions
    r0, r1 = res.history
    assert r0.strategist_used == "llm" and r1.strategist_used == "llm"
    assert any("rejected response_format" in n for n in r0.proposal_notes)
    # revision 1 saw revision 0 in its history table
    assert "l1 | 8 | global" in last_user_message(reqs[2])


def test_duplicate_llm_plan_is_replaced(server, cnn):
    server.push(Reply.json(VALID_CNN), Reply.json(VALID_CNN))
    res = search(cnn, llm(server), revisions=2)
    r1 = res.history[1]
    assert r1.strategist_used == "heuristic" and "duplicates revision 0" in r1.fallback_reason
    assert r1.signature != res.history[0].signature


def test_unreachable_endpoint_fails_at_startup(cnn):
    calls = []
    bridge, ctx = cnn
    bad = LLMStrategist(LLMConfig(base_url="http://127.0.0.1:9/v1", model="test-model", timeout=1, http_retries=0),
                        fallback=False)
    with pytest.raises(LLMUnavailable, match="unreachable"):
        run_search(ctx, bad, SafetyValidator(), MasterAgent(max_revisions=1), lambda p, s: calls.append(p))
    assert calls == []  # nothing was pruned


def test_unreachable_endpoint_with_fallback_warns_and_records(cnn):
    s = LLMStrategist(LLMConfig(base_url="http://127.0.0.1:9/v1", model="test-model", timeout=1, http_retries=0),
                      fallback=True)
    with pytest.warns(RuntimeWarning, match="falling back to the heuristic"):
        res = search(cnn, s, revisions=2)
    assert all(r.strategist_used == "heuristic" and r.fallback_reason.startswith("LLM unavailable at startup")
               for r in res.history)
    assert res.history[0].in_band


def test_model_not_served_is_a_clear_startup_error():
    with ScriptedLLMServer(models=["other-model"]) as srv:
        s = LLMStrategist(LLMConfig(base_url=srv.base_url, model="test-model", timeout=1), fallback=False)
        with pytest.raises(LLMUnavailable, match="'test-model' is not served"):
            s.check()
    s = LLMStrategist(LLMConfig(base_url="http://127.0.0.1:9/v1"), fallback=False)
    with pytest.raises(LLMUnavailable, match="no LLM model configured"):
        s.check()


@pytest.mark.parametrize("reply", ["http500", "garbage"])
def test_no_fallback_stops_on_any_llm_failure(cnn, reply):
    """With fallback disabled, an HTTP error or persistently invalid output ends the search with one line."""
    with ScriptedLLMServer() as srv:
        for _ in range(4):
            srv.push(Reply.error(500, "boom") if reply == "http500" else Reply.text("no json here"))
        s = LLMStrategist(LLMConfig(base_url=srv.base_url, model="test-model", timeout=2, http_retries=0),
                          fallback=False)
        with pytest.raises(LLMUnavailable, match="fallback is disabled") as err:
            search(cnn, s, revisions=1)
    assert "\n" not in str(err.value)


def test_check_without_models_route_pings_chat():
    with ScriptedLLMServer(models_route=False) as srv:
        srv.push(Reply.text("pong"))
        LLMStrategist(LLMConfig(base_url=srv.base_url, model="test-model", timeout=1)).check()  # no error
        assert [q.path for q in srv.requests] == ["/v1/models", "/v1/chat/completions"]
        assert srv.requests[1].body["max_tokens"] == 1
        srv.push(Reply.error(503, "overloaded"))
        with pytest.raises(LLMUnavailable, match="HTTP 503"):
            LLMStrategist(LLMConfig(base_url=srv.base_url, model="test-model", timeout=1), fallback=False).check()


def test_api_key_only_in_header_never_stored_or_logged(monkeypatch, cnn, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with ScriptedLLMServer() as srv:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("AGENTIC_PRUNER_LLM_BASE_URL", srv.base_url)
        monkeypatch.setenv("AGENTIC_PRUNER_LLM_MODEL", "test-model")
        cfg = LLMConfig()
        assert cfg.base_url == srv.base_url and cfg.model == "test-model"
        assert cfg.api_key.get_secret_value() == KEY
        # an endpoint that echoes the key: the stored raw reply is scrubbed
        srv.push(Reply.text(f"{json.dumps(VALID_CNN)} (your key {KEY})"), Reply.error(500, f"bad key {KEY}"))
        s = LLMStrategist(cfg.model_copy(update={"http_retries": 0, "timeout": 2}))
        res = search(cnn, s, revisions=2)
        reqs = list(srv.requests)
    assert len(reqs) == 3  # GET /models + 2 chat calls
    for q in reqs:
        headers = {k.lower(): v for k, v in q.headers.items()}
        assert headers["authorization"] == f"Bearer {KEY}"
        assert KEY not in q.path and KEY.encode() not in q.raw_body
        assert all(KEY not in v for k, v in headers.items() if k != "authorization")
    path = tmp_path / "h.jsonl"
    to_jsonl(res.history, path)
    stored = path.read_text()
    assert KEY not in stored and "***" in stored
    assert res.history[1].fallback_reason and "HTTP 500" in res.history[1].fallback_reason
    assert from_jsonl(path)[0].strategist_used == "llm"
    assert KEY not in repr(cfg) and KEY not in str(cfg) and KEY not in cfg.model_dump_json()
    assert "api_key" not in cfg.model_dump()
    assert KEY not in caplog.text
