"""LLM pruning: Wanda, exact rollback, N:M, OWL, the embedded tiny Qwen3, the agent loop, the LLM strategist."""
import json
import math

import pytest
import torch
from llm_server import Reply, ScriptedLLMServer
from torch import nn

from agents.llm_pruning import (
    HeuristicPruneStrategist,
    LLMPruneConfig,
    LLMPruneStrategist,
    PruneDecision,
    history_jsonl,
    read_history_jsonl,
    run_prune_agent,
)
from agents.strategists import LLMConfig
from pruning.llm import baselines
from pruning.llm.masks import MaskedModel, PruneStep
from pruning.llm.mcq import evaluate_mcq, load_mcq
from pruning.llm.perplexity import perplexity
from pruning.llm.session import DataConfig, PruneSession
from pruning.llm.stats import activation_norms, prunable_linears
from pruning.llm.tiny_model import (
    ByteTokenizer,
    ModelNotFound,
    TinyLMConfig,
    build_tiny_model,
    load_causal_lm,
    train_tiny_model,
)
from pruning.llm.wanda import nm_prune_indices, row_prune_indices, wanda_scores

# Smaller than the default (hidden 128, 400 steps): a few seconds of training on 2 CPU cores.
TEST_TINY = TinyLMConfig(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192,
                         seq_len=64, batch_size=16, steps=120, lr=4e-3, warmup=20, eval_tokens=4096)
TEST_DATA = DataConfig(seq_len=64, calib_sequences=8, grad_sequences=8, eval_tokens=2048)


def shared_cache_dir(tmp_path_factory):
    """$AGENTIC_PRUNER_CACHE/llm of this test session (shared by the LLM test modules: trained once)."""
    return tmp_path_factory.getbasetemp() / "agentic-pruner-cache" / "llm"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return train_tiny_model(TEST_TINY, shared_cache_dir(tmp_path_factory))


@pytest.fixture(scope="session")
def shared_session(tiny_dir):
    sess = PruneSession.embedded(TEST_TINY, TEST_DATA, cache_dir=tiny_dir.parent)
    sess.compute_stats()
    return sess


@pytest.fixture
def sess(shared_session):
    shared_session.reset()
    yield shared_session
    shared_session.reset()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
def test_wanda_scores_and_row_selection_hand_example():
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]])
    norms = torch.tensor([2.0, 1.0, 0.5])
    s = wanda_scores(w, norms)
    assert torch.equal(s, torch.tensor([[2.0, 2.0, 1.5], [8.0, 0.5, 0.5]]))
    # one of three weights per row: row 0 -> column 2 (1.5), row 1 -> column 1 (tie 0.5/0.5, first wins)
    assert row_prune_indices(s, None, 1 / 3).tolist() == [2, 4]
    # incremental: with those already pruned, going to 2/3 adds row 0 col 0 (tie 2/2, first) and row 1 col 2
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep.view(-1)[torch.tensor([2, 4])] = False
    assert row_prune_indices(s, keep, 2 / 3).tolist() == [0, 5]


def test_activation_norms_hooks_hand_example():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(3, 2, bias=False)])

        def forward(self, input_ids):
            return self.layers[0](input_ids)

    toy = Toy()
    x = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]])  # 1 sequence, 2 tokens, 3 features
    layers = prunable_linears(toy)
    assert list(layers) == ["0.layers.0"] or list(layers) == ["0.0"] or len(layers) == 1
    name = next(iter(layers))
    out_before = toy(x)
    norms = activation_norms(toy, x, layers)
    assert torch.allclose(norms[name], torch.tensor([10 ** 0.5, 2.0, 1.0]))
    assert not toy.layers[0]._forward_pre_hooks  # hooks removed
    assert torch.equal(toy(x), out_before)


def test_trained_model_beats_random_init(tiny_dir, shared_session):
    info = json.loads((tiny_dir / "training.json").read_text())
    assert info["random_init_ppl"]["val"] > 150  # ~ uniform over 259 byte tokens
    assert info["trained_ppl"]["val"] < 0.2 * info["random_init_ppl"]["val"]
    assert info["trained_ppl"]["test"] < 0.2 * info["random_init_ppl"]["test"]
    cfg = shared_session.model.config
    assert cfg.model_type == "qwen3" and cfg.num_key_value_heads < cfg.num_attention_heads
    rand = build_tiny_model(TEST_TINY)
    stream = shared_session.data.test
    assert perplexity(shared_session.model, stream, 64) < 0.2 * perplexity(rand, stream, 64)


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ModelNotFound, match="config.json"):
        load_causal_lm(tmp_path)
    assert isinstance(ModelNotFound("x"), FileNotFoundError)  # the CLI reports it as one line


def test_rollback_restores_weights_bit_exactly(sess):
    before = _snapshot(sess.model)
    x = sess.data.val[:65][None]
    logits_before = sess.model(input_ids=x).logits
    baselines.wanda_prune(sess.mm, sess.norms, 0.2)
    mid = _snapshot(sess.model)
    step2 = baselines.wanda_prune(sess.mm, sess.norms, 0.5)
    assert abs(sess.mm.overall_sparsity() - 0.5) < 0.01
    assert abs(sess.mm.zero_fraction() - sess.mm.overall_sparsity()) < 1e-3
    sess.mm.rollback(step2)
    assert _equal(_snapshot(sess.model), mid)
    sess.mm.rollback()
    assert _equal(_snapshot(sess.model), before)
    assert sess.mm.overall_sparsity() == 0.0
    assert torch.equal(sess.model(input_ids=x).logits, logits_before)
    # a persisted step round-trips and replays onto the original weights
    step = baselines.magnitude_prune(sess.mm, 0.3)
    state = PruneStep.from_state(step.to_state())
    sess.mm.rollback()
    sess.mm.replay(state)
    assert abs(sess.mm.overall_sparsity() - 0.3) < 0.01


def test_nm_2_4_pattern(sess):
    s = torch.arange(8.0).flip(0).reshape(1, 8)  # scores 7..0: the two lowest of each group of 4 go
    assert sorted(nm_prune_indices(s, None, 2, 4).tolist()) == [2, 3, 6, 7]
    baselines.wanda_prune(sess.mm, sess.norms, 0.5, nm=(2, 4))
    for name, info in sess.layers.items():
        w = info.module.weight.detach()
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), name
    assert abs(sess.mm.overall_sparsity() - 0.5) < 1e-9


def test_owl_allocation_averages_to_target(sess):
    alloc = baselines.owl_allocation({0: 0.01, 1: 0.03, 2: 0.02}, 0.5, lam=0.08)
    assert alloc == pytest.approx({0: 0.58, 1: 0.42, 2: 0.50})
    ratios = baselines.owl_outlier_ratios(sess.mm, sess.norms)
    assert len(ratios) == TEST_TINY.num_layers
    for target in (0.3, 0.45, 0.6):
        a = baselines.owl_allocation(ratios, target)
        assert sum(a.values()) / len(a) == pytest.approx(target, abs=1e-12)
        assert max(a.values()) - min(a.values()) == pytest.approx(0.16)  # spread 2 x lambda
        # more outliers -> less pruning
        hi, lo = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
        assert a[hi] < a[lo]
    _, a = baselines.owl_prune(sess.mm, sess.norms, 0.45)
    assert sess.mm.overall_sparsity() == pytest.approx(0.45, abs=0.01)


def test_profile_zscores(sess):
    prof = sess.profile
    assert len(prof.layers) == 7 * TEST_TINY.num_layers
    for field in ("z_wanda", "z_grad", "z_combined"):
        vals = [getattr(l, field) for l in prof.layers]
        assert abs(sum(vals) / len(vals)) < 1e-9
    assert all(l.grad > 0 and l.wanda > 0 for l in prof.layers)


def test_agent_reaches_target_with_history(sess, tmp_path):
    seen = []
    cfg = LLMPruneConfig(target_sparsity=0.35, rollback_threshold=0.10)
    res = run_prune_agent(sess, HeuristicPruneStrategist(), cfg, on_record=lambda r, s: seen.append((r, s)))
    assert res.reached and res.stop_reason == "target-reached"
    assert sess.mm.overall_sparsity() >= 0.35 - cfg.tolerance
    assert abs(res.final_sparsity - 0.35) < 0.005  # the last step is scaled to land on the target
    assert len(seen) == res.iterations >= 3
    assert [r.iteration for r, _ in seen] == list(range(res.iterations))
    for r, step in seen:
        assert (step is not None) == r.accepted
        if r.accepted:
            assert r.ppl_after <= r.ppl_before * 1.10 + 1e-9 and r.sparsity > r.sparsity_before
    assert all(s <= cfg.max_layer_sparsity + 1e-9 for s in res.layer_sparsities.values())
    assert res.final_ppl == pytest.approx(sess.val_ppl(), rel=1e-6)
    # JSON lines round trip
    path = tmp_path / "history.jsonl"
    path.write_text(history_jsonl(res.history))
    assert read_history_jsonl(path.read_text()) == res.history


def test_rollback_in_loop_is_exact_and_reported(sess):
    base = sess.val_ppl()
    calls = []

    def evaluate():  # iteration 1 "degrades" by 50 %: it must be rolled back
        calls.append(1)
        if len(calls) == 2:
            return base * 1.5
        return sess.val_ppl()

    snaps = {}

    def on_record(rec, step):
        snaps[rec.iteration] = _snapshot(sess.model)

    cfg = LLMPruneConfig(target_sparsity=0.2, max_iterations=4)
    res = run_prune_agent(sess, HeuristicPruneStrategist(), cfg, evaluate=evaluate, on_record=on_record,
                          baseline_ppl=base)
    h = res.history
    assert h[1].rolled_back and not h[1].accepted and "rolled back" in h[1].reason
    assert h[1].sparsity == h[0].sparsity and h[1].sparsity_after > h[0].sparsity
    assert _equal(snaps[1], snaps[0])  # rollback restored the weights exactly
    # self-reflection: the next decision avoids the rolled-back layers (cool-down) and steps smaller
    assert not set(h[2].applied) & set(h[1].applied)
    assert max(x.increase for x in h[2].requested) < max(x.increase for x in h[1].requested)
    assert res.rollbacks == 1


def test_agent_nm_mode(sess):
    res = run_prune_agent(sess, "heuristic", LLMPruneConfig(target_sparsity=0.25, nm="2:4"))
    assert res.reached
    for name, info in sess.layers.items():
        w = info.module.weight.detach()
        if sess.mm.layer_sparsity(name) > 0:
            assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())
    with pytest.raises(ValueError, match="exceeds"):
        LLMPruneConfig(target_sparsity=0.6, nm="2:4")


def test_llm_strategist_loopback_with_malformed_reply_fallback(sess):
    names = sess.profile.names
    with ScriptedLLMServer(models=["test-model"]) as srv:
        srv.push(
            Reply.json({"layers": [{"layer": names[0], "increase": 0.1}, {"layer": names[5], "increase": "5%"}],
                        "rationale": "prune the first query projection and a gate"}),
            Reply.text("I think you should prune everything!"),  # malformed: no JSON
            Reply.json({"layers": [{"layer": "99.nope", "increase": 0.1}]}),  # re-ask answered with a bad name
        )
        strat = LLMPruneStrategist(LLMConfig(base_url=srv.base_url, model="test-model", max_retries=1))
        strat.check()
        res = run_prune_agent(sess, strat, LLMPruneConfig(target_sparsity=0.3, max_iterations=2))
        reqs = srv.chat_requests()
    h = res.history
    assert h[0].strategist == "llm" and h[0].fallback_reason is None
    assert h[0].applied.keys() == {names[0], names[5]}
    assert h[0].requested[1].increase == pytest.approx(0.05)
    assert h[1].fallback_reason is not None and "invalid LLM output after 2 attempts" in h[1].fallback_reason
    assert h[1].strategist == "heuristic" and "prune everything" in h[1].raw_reply
    assert res.fallbacks == 1
    assert len(reqs) == 3
    first_user = reqs[0].body["messages"][1]["content"]
    assert names[0] in first_user and "z_comb" in first_user and "(none yet)" in first_user
    second_user = reqs[1].body["messages"][1]["content"]
    assert "History of your decisions" in second_user and "accepted" in second_user  # self-reflection input
    reask = reqs[2].body["messages"][-1]["content"]
    assert "invalid" in reask and "no JSON object" in reask


def test_prune_decision_schema():
    d = PruneDecision.model_validate({"layers": [{"layer": "0.q_proj", "increase": "10%"}], "extra": 1})
    assert d.layers[0].increase == pytest.approx(0.1)
    with pytest.raises(Exception):
        PruneDecision.model_validate({"layers": [{"layer": "0.q_proj", "increase": 0.9}]})
    with pytest.raises(Exception):
        PruneDecision.model_validate({"layers": [{"layer": "a", "increase": 0.1}, {"layer": "a", "increase": 0.1}]})
    with pytest.raises(Exception):
        PruneDecision.model_validate({"layers": []})


def test_mcq_choice_loglikelihood(shared_session, tmp_path):
    real = "Return a new list containing all items from the iterable in ascending order."
    junk = "".join(chr(33 + (i * 37) % 90) for i in range(len(real)))  # same length, no language
    lines = [
        {"question": "What does sorted() do?", "choices": [real, junk], "answer": 0},
        {"question": "What does sorted() do?", "choices": [junk, real], "answer": "B"},
        {"question": "Pick", "choices": [junk, real], "answer": real, "subject": "s"},
    ]
    path = tmp_path / "mcq.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = load_mcq(path)
    assert [i.answer for i in items] == [0, 1, 1]
    res = evaluate_mcq(shared_session.model, shared_session.tokenizer, items)
    assert res.n == 3 and res.accuracy == 1.0 and res.per_subject == {"s": 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_mcq(bad)


def test_byte_tokenizer_roundtrip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode("héllo", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.decode(ids) == "héllo"
    tok.save(tmp_path)
    assert isinstance(ByteTokenizer.load(tmp_path), ByteTokenizer)


def test_masked_model_rejects_bad_rollback(sess):
    mm = MaskedModel(sess.model, sess.layers)
    with pytest.raises(RuntimeError):
        mm.rollback()


# ------------------------------------------------------------------------------------------------
# other architectures (random-init, tiny, built from transformers configs): GPT-2 stores its projections
# as Conv1D ([in, out] weights); Llama, OPT and GPT-NeoX use nn.Linear under other block paths and names
def _arch_model(arch: str):
    import transformers as tf

    tok = ByteTokenizer()
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        cfg, cls = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids), tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg, cls = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, **ids), tf.LlamaForCausalLM
    elif arch == "opt":
        cfg, cls = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=128, word_embed_proj_dim=64, **ids), tf.OPTForCausalLM
    else:
        cfg, cls = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128, **ids), tf.GPTNeoXForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval(), tok


ARCH_DATA = DataConfig(seq_len=32, calib_sequences=4, grad_sequences=4, eval_tokens=512)
ARCH_LAYERS = {"gpt2": {"0.c_attn", "0.c_proj", "0.c_fc", "0.mlp.c_proj"},
               "llama": {"0.q_proj", "0.k_proj", "0.v_proj", "0.o_proj", "0.gate_proj", "0.up_proj", "0.down_proj"},
               "opt": {"0.q_proj", "0.k_proj", "0.v_proj", "0.out_proj", "0.fc1", "0.fc2"},
               "gpt_neox": {"0.query_key_value", "0.dense", "0.dense_h_to_4h", "0.dense_4h_to_h"}}


@pytest.fixture(scope="module")
def arch_data():
    from pruning.llm.session import prepare_data

    return prepare_data(ByteTokenizer(), ARCH_DATA)


def test_conv1d_storage_index_hand_example():
    from transformers.pytorch_utils import Conv1D

    from pruning.llm.stats import LinearInfo, linear_map_kind

    conv = Conv1D(3, 2)  # nf=3 outputs, nx=2 inputs: weight stored [in=2, out=3], y = x @ W + b
    with torch.no_grad():
        conv.weight.copy_(torch.arange(6.0).reshape(2, 3))
    assert linear_map_kind(conv) == "conv1d" and linear_map_kind(nn.Linear(2, 3)) == "linear"
    assert linear_map_kind(nn.Embedding(4, 2)) is None
    info = LinearInfo("0.c", "c", 0, "c", conv, transposed=True)
    assert info.weight.shape == (3, 2) and info.in_features == 2
    logical = torch.arange(6)  # [out, in] row-major: (o0,i0) (o0,i1) (o1,i0) ...
    assert info.weight.reshape(-1)[logical].tolist() == conv.weight.view(-1)[info.storage_index(logical)].tolist()
    mm = MaskedModel(conv, {"0.c": info})
    step = mm.prune({"0.c": torch.tensor([1, 4])})  # out 0 / in 1 and out 2 / in 0
    assert conv.weight.tolist() == [[0.0, 1.0, 0.0], [0.0, 4.0, 5.0]]
    assert mm.masks["0.c"].tolist() == [[True, False], [True, True], [False, True]]
    mm.rollback(step)
    assert conv.weight.view(-1).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gpt_neox"])
def test_other_architectures_prune_to_half_reload_and_generate(arch, arch_data, tmp_path):
    """Wanda at 50 % and the agent loop on each architecture; the saved model reloads with its zeros and
    generates."""
    model, tok = _arch_model(arch)
    sess = PruneSession(model, tok, arch_data, ARCH_DATA, arch)
    assert set(ARCH_LAYERS[arch]) <= set(sess.layers) and len(sess.layers) == 2 * len(ARCH_LAYERS[arch])
    assert all(l.grad > 0 and l.wanda > 0 for l in sess.profile.layers)
    before = _snapshot(model)
    baselines.wanda_prune(sess.mm, sess.norms, 0.5)
    assert sess.mm.overall_sparsity() == pytest.approx(0.5)
    for name, info in sess.layers.items():  # the zeros are where the [out, in] masks say (Conv1D included)
        assert torch.equal(info.weight.detach() == 0, ~sess.mm.masks[name]), name
    sess.reset()
    assert _equal(_snapshot(model), before)
    res = run_prune_agent(sess, HeuristicPruneStrategist(), LLMPruneConfig(target_sparsity=0.5, rollback_threshold=50.0))
    assert res.reached and sess.mm.overall_sparsity() == pytest.approx(0.5, abs=0.005)
    assert math.isfinite(sess.val_ppl())
    out = tmp_path / arch
    model.save_pretrained(str(out))
    tok.save(out)
    reloaded, tok2 = load_causal_lm(out)
    again = prunable_linears(reloaded)
    zeros = sum(int((i.weight == 0).sum()) for i in again.values()) / sum(i.params for i in again.values())
    assert zeros == pytest.approx(sess.mm.overall_sparsity(), abs=1e-3)
    prompt = torch.tensor([tok2.encode("def main", add_bos=True)])
    gen = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert gen.shape == (1, prompt.shape[1] + 6)
