"""Full agent search on resnet18 (10 classes, 32x32) with the heuristic strategist and a cheap evaluator."""
from __future__ import annotations

import io

import pytest
import timm
import torch

from agents.history import from_jsonl, history_dataframe, to_jsonl
from agents.master import MasterAgent, MasterConfig
from agents.safety import SafetyValidator
from agents.search import Evaluated, SearchContext, run_search
from agents.strategists import HeuristicStrategist
from pruning.solver import MacBand
from pruning.space import count_macs_params, example_input
from tasks.memory_steps import logit_similarity_evaluator, search_steps

COMPARED = ("revision", "strategist_used", "move", "parent_revision", "verdict", "verdict_reasons", "plan", "status",
            "solver_ratio", "achieved_macs", "params", "error_pct", "in_band", "accuracy_before", "collapsed")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    ex = example_input(32)
    base, _ = count_macs_params(model, ex)
    band = MacBand(target_macs=base * 0.6, overshoot_pct=5, undershoot_pct=15)
    inputs = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bridge = search_steps(model, ex, band, logit_similarity_evaluator(model, inputs))
    profile = bridge.profile(model_name="resnet18", dataset="cifar10", num_classes=10)
    ctx = SearchContext(band=band, profile=profile, baseline_accuracy=bridge.baseline_accuracy(), seed=0)
    return model, ex, band, bridge, ctx


def make_master():
    # the proxy "accuracy" of a random-init net is harsh; collapse = 20 points below the (perfect) baseline
    return MasterAgent(MasterConfig(max_revisions=8, extra_revisions=4, collapse_drop=0.2))


def counting(fn, calls):
    def wrapped(plan, slot):
        calls.append(plan)
        return fn(plan, slot)

    return wrapped


@pytest.fixture(scope="module")
def full_run(setup):
    model, ex, band, bridge, ctx = setup
    seen = []
    res = run_search(ctx, HeuristicStrategist(), SafetyValidator(), make_master(), bridge.prune_and_measure,
                     bridge.finetune_and_evaluate, on_record=seen.append)
    return res, seen


def test_search_converges_and_selects_best_in_band(setup, full_run):
    model, ex, band, bridge, ctx = setup
    res, seen = full_run
    h = res.history
    assert [r.revision for r in h] == list(range(len(h))) and seen == h
    assert ctx.baseline_accuracy == pytest.approx(1.0)
    assert h[0].in_band and h[0].status == "ok" and h[0].move == "initial"  # first revision lands in band
    assert 2 <= len(h) <= 8
    assert ("two-phase search complete" in res.stop_reason or "MAC convergence" in res.stop_reason), res.stop_reason
    # every achieved MAC count is re-counted on the pruned model and inside the band; a shape that solves to
    # an allocation already evaluated (here: layer1 multipliers that change nothing) is not fine-tuned again
    ok_digests = {r.allocation_digest for r in h if r.status == "ok"}
    for r in h:
        if r.status == "rejected":
            assert r.error.startswith("duplicate:") and r.allocation_digest in ok_digests
        assert r.status in ("ok", "rejected") and r.in_band and band.contains(r.achieved_macs)
        assert r.verdict in ("accepted", "clamped") and r.accuracy_before is not None
        assert abs(r.error_pct) < 5
    # never the same plan twice
    assert len({r.signature for r in h}) == len(h)
    # best = highest accuracy among in-band candidates
    cands = [r for r in h if r.is_candidate]
    assert res.best_in_band and res.best.accuracy == max(r.accuracy for r in cands)
    assert res.best_revision == res.best.revision
    # the executed best plan really gives the recorded MACs (search independence: prune from the original)
    from pruning.solver import solve
    from pruning.space import PruningSpace

    plan = res.best.plan
    space = PruningSpace.build(model, ex, plan)
    macs, _ = count_macs_params(space.apply(solve(space, plan, band).cuts()), ex)
    assert macs == pytest.approx(res.best.achieved_macs)


def test_history_roundtrip_and_table(full_run):
    res, _ = full_run
    buf = io.StringIO()
    to_jsonl(res.history, buf)
    back = from_jsonl(buf.getvalue())
    assert [r.model_dump() for r in back] == [r.model_dump() for r in res.history]
    df = history_dataframe(back)
    assert len(df) == len(res.history) and {"revision", "error_pct", "in_band", "accuracy", "verdict"} <= set(df.columns)
    assert df["in_band"].all()


def test_resume_reproduces_the_same_result(setup, full_run, tmp_path):
    model, ex, band, bridge, ctx = setup
    full, _ = full_run
    path = tmp_path / "history.jsonl"
    to_jsonl(full.history[:2], path)
    partial = from_jsonl(path)
    calls, new_records = [], []
    res = run_search(ctx, HeuristicStrategist(), SafetyValidator(), make_master(),
                     counting(bridge.prune_and_measure, calls), bridge.finetune_and_evaluate,
                     on_record=new_records.append, resume_history=partial)
    assert res.resumed_revisions == 2 and res.new_revisions == len(full.history) - 2
    assert len(calls) == len(full.history) - 2  # finished revisions are never redone
    assert [r.revision for r in new_records] == list(range(2, len(full.history)))
    assert [r.model_dump(include=set(COMPARED)) for r in res.history] == [
        r.model_dump(include=set(COMPARED)) for r in full.history]
    assert res.best_revision == full.best_revision and res.stop_reason == full.stop_reason
    # resuming a finished search does nothing
    calls.clear()
    done = run_search(ctx, HeuristicStrategist(), SafetyValidator(), make_master(),
                      counting(bridge.prune_and_measure, calls), resume_history=full.history)
    assert calls == [] and done.new_revisions == 0 and done.best_revision == full.best_revision


def test_resume_rejects_gaps(setup, full_run):
    *_, ctx = setup
    full, _ = full_run
    with pytest.raises(ValueError, match="without gaps"):
        run_search(ctx, HeuristicStrategist(), SafetyValidator(), make_master(), lambda p, s: None,
                   resume_history=[full.history[0], full.history[2]])


def test_infeasible_target_is_recorded_not_crashing(setup):
    model, ex, band, bridge, ctx = setup
    tiny = MacBand(target_macs=ctx.profile.base_macs * 0.01, overshoot_pct=1, undershoot_pct=5)
    b2 = search_steps(model, ex, tiny)
    ctx2 = ctx.model_copy(update={"band": tiny, "baseline_accuracy": None})
    res = run_search(ctx2, HeuristicStrategist(), SafetyValidator(), MasterAgent(max_revisions=3),
                     b2.prune_and_measure)
    assert [r.status for r in res.history] == ["infeasible"] * 3
    assert "feasible range" in res.history[0].error
    assert not res.best_in_band and "maximum revisions" in res.stop_reason
    moves = [r.move for r in res.history]
    # at a 99 % reduction the initial shape is already uniform; phase 1 then tries other distinct shapes
    assert moves[0] == "initial" and len(set(moves)) == 3
    assert res.history[0].plan.kind_multipliers.get("residual", 1.0) == 1.0
    g = MasterAgent().analyze(res.history, tiny, ctx2.profile)
    assert g.stagnating and len(g.danger_zones) == 3


def test_taylor_with_calibrated_copy(setup):
    model, ex, band, _, ctx = setup
    import copy

    calib = copy.deepcopy(model)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(calib(x), torch.arange(8) % 10).backward()
    b = search_steps(model, ex, band, calibrated_model=calib)
    prof = b.profile()
    assert prof.taylor_available
    ctx2 = ctx.model_copy(update={"profile": prof, "baseline_accuracy": None,
                                  "base_plan": ctx.base_plan.model_copy(update={"importance": "taylor"})})
    res = run_search(ctx2, HeuristicStrategist(), SafetyValidator(), MasterAgent(max_revisions=1), b.prune_and_measure)
    r = res.history[0]
    assert r.plan.importance == "taylor" and r.in_band and r.status == "ok"
    assert all(p.grad is None for p in model.parameters())  # the original is untouched


# -- K candidates per revision -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched_run(setup):
    model, ex, band, bridge, ctx = setup
    ctx3 = ctx.model_copy(update={"candidates_per_revision": 3})
    batches = []

    def batch(items):  # stands in for parallel fine-tuning: records what was submitted together
        batches.append([(m.revision, m.candidate) for m in items])
        return [Evaluated(accuracy_after=m.accuracy_before) for m in items]

    seen = []
    res = run_search(ctx3, HeuristicStrategist(), SafetyValidator(),
                     MasterAgent(MasterConfig(max_revisions=3, extra_revisions=2, collapse_drop=0.2)),
                     bridge.prune_and_measure, on_record=seen.append, finetune_batch=batch)
    return ctx3, res, seen, batches


def test_k_candidates_per_revision_are_distinct_and_batched(setup, batched_run):
    *_, band, bridge, ctx = setup
    ctx3, res, seen, batches = batched_run
    h = res.history
    slots = [(r.revision, r.candidate) for r in h]
    assert slots == [(r, c) for r in range(3) for c in range(3)], slots  # one record per candidate, in order
    assert seen == h
    assert len({r.signature for r in h}) == len(h)  # no shape evaluated twice, also within a revision
    # the fine-tuning callback got each revision's in-band candidates together, once
    assert batches == [[(r, c) for c in range(3)] for r in range(3)]
    assert all(r.in_band and band.contains(r.achieved_macs) for r in h)
    assert h[0].move == "initial" and h[1].move != "initial"
    # the master chose the best over all 9 candidates
    assert res.best.accuracy == max(r.accuracy for r in h)
    assert (res.best_revision, res.best_candidate) == (res.best.revision, res.best.candidate)


def test_resume_completes_a_partly_recorded_revision(setup, batched_run):
    *_, bridge, ctx = setup
    ctx3, full, _, _ = batched_run
    calls = []
    partial = full.history[:4]  # revision 0 complete, revision 1 only candidate 0

    res = run_search(ctx3, HeuristicStrategist(), SafetyValidator(),
                     MasterAgent(MasterConfig(max_revisions=3, extra_revisions=2, collapse_drop=0.2)),
                     counting(bridge.prune_and_measure, calls), resume_history=partial,
                     finetune_batch=lambda items: [Evaluated(accuracy_after=m.accuracy_before) for m in items])
    assert len(calls) == 9 - 4  # recorded candidates are not pruned again
    assert [(r.revision, r.candidate) for r in res.history] == [(r.revision, r.candidate) for r in full.history]
    assert [r.model_dump(include=set(COMPARED)) for r in res.history] == [
        r.model_dump(include=set(COMPARED)) for r in full.history]


def test_history_rejects_a_slot_twice(setup, batched_run):
    ctx3, full, _, _ = batched_run
    from agents.history import check_history

    with pytest.raises(ValueError, match="revision 1 candidate 2 twice"):
        check_history(full.history + [full.history[5]])


def test_a_shape_that_solves_to_a_known_allocation_is_not_fine_tuned_again(setup):
    *_, bridge, ctx = setup
    ctx2 = ctx.model_copy(update={"candidates_per_revision": 2})

    def same_model(plan, slot):  # every shape "solves" to one allocation
        m = bridge.prune_and_measure(plan, slot)
        m.allocation_digest = "same"
        return m

    tuned = []

    def batch(items):
        tuned.extend((m.revision, m.candidate) for m in items)
        return [Evaluated(accuracy_after=m.accuracy_before) for m in items]

    res = run_search(ctx2, HeuristicStrategist(), SafetyValidator(), MasterAgent(max_revisions=2), same_model,
                     finetune_batch=batch)
    assert tuned == [(0, 0)]  # only the first of the identical pruned models was fine-tuned
    dups = [r for r in res.history if r.status == "rejected"]
    assert len(dups) == 3 and all(r.error.startswith("duplicate: the solved allocation equals revision 0 candidate 0")
                                  for r in dups)
    assert res.best.revision == 0 and res.best.candidate == 0
    zones = MasterAgent().analyze(res.history, ctx.band, ctx.profile).danger_zones
    assert not [z for z in zones if z.reason.startswith("rejected")]  # a duplicate is not a danger zone
