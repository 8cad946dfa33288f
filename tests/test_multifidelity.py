"""Multi-fidelity selection: successive-halving rungs of inline fine-tuning, recorded, stored and resumable."""
import pytest
import torch
from pydantic import ValidationError

from agents.history import RevisionRecord, RungResult, from_jsonl, to_jsonl
from agents.master import MasterAgent, MasterConfig, select_best
from agents.safety import SafetyValidator
from agents.search import RungSchedule, SearchContext, promoted, run_search
from agents.strategists import HeuristicStrategist
from pruning.plan import PruningPlan
from tasks import steps
from tasks.config import RunConfig


def _rec(rev: int, accs: list[float]) -> RevisionRecord:
    return RevisionRecord(revision=rev, strategist="heuristic", strategist_used="heuristic", plan=PruningPlan(),
                          in_band=True, accuracy_after=accs[-1],
                          rungs=[RungResult(rung=i, epochs=i + 1, accuracy=a) for i, a in enumerate(accs)])


def test_schedule_and_config_validation():
    assert RungSchedule.from_fractions([0.34, 0.67, 1], 3).epochs == [1, 2, 3]
    assert RunConfig().rung_schedule() is None  # default: one rung, today's behaviour
    assert RunConfig(rungs="0.5,1", inline_epochs=4, rung_keep=0.25).rung_schedule() == RungSchedule(epochs=[2, 4],
                                                                                                      keep=0.25)
    for bad in ("1,0.5", "0.5", "0,1", "abc"):
        with pytest.raises(ValidationError, match="rungs"):
            RunConfig(rungs=bad)
    with pytest.raises(ValidationError, match="do not increase"):
        RunConfig(rungs="0.2,0.4,1", inline_epochs=2)
    # the default keeps the run ids of earlier versions; rungs make another run
    assert "rungs" not in RunConfig().identity()
    assert RunConfig(rungs="0.5,1").resolved_run_id() != RunConfig().resolved_run_id()


def test_promotion_ranks_against_this_and_earlier_revisions():
    assert promoted({0: 0.9, 1: 0.7, 2: 0.8, 3: 0.6}, 0, [], 0.5) == [0, 2]
    assert promoted({0: 0.9}, 0, [], 0.5) == [0]  # a lone first candidate always advances
    hist = [_rec(0, [0.95, 0.97]), _rec(1, [0.85]), _rec(2, [0.92])]
    assert promoted({0: 0.9}, 0, hist, 0.5) == []  # 4 results at rung 0: the top 2 advance, not 0.9
    assert promoted({0: 0.96, 1: 0.9}, 0, hist, 0.5) == [0]  # 5 results: the top 3
    assert promoted({0: 0.92}, 0, hist, 0.5) == [0]  # a tie with the threshold advances
    assert promoted({0: None, 1: None}, 0, hist, 0.5) == [0, 1]  # nothing to rank by: all advance
    # selection prefers the candidates that reached the last rung, even a collapsed one over a healthy rung-0 one
    late = _rec(3, [0.99])
    assert select_best(hist + [late]).revision == 0
    hist[0].collapsed = True
    assert select_best(hist + [late]).revision == 0


@pytest.fixture()
def cfg(tmp_path):
    return RunConfig(store=str(tmp_path / "store"), model="resnet18", num_classes=10, target_macs="45%",
                     inline_epochs=2, rungs="0.5,1", rung_keep=0.5, max_train_batches=2, calibration_batches=1,
                     importance="l1", latency=False, candidates_per_revision=3, max_revisions=2, extra_revisions=1)


def _search(cfg: RunConfig, resume=()):
    info = steps.open_run(cfg)
    ctx = steps.get_context(cfg, info.run_id)
    baseline = steps.prepare_original(ctx)
    profile = steps.profile_run(ctx)
    validator = SafetyValidator(dataset=cfg.data)
    context = SearchContext(band=ctx.band(), profile=profile, base_plan=PruningPlan(importance="l1"),
                            baseline_accuracy=baseline.val_accuracy, seed=0, candidates_per_revision=3,
                            rungs=cfg.rung_schedule())
    result = run_search(
        context, HeuristicStrategist(limits=validator.limits), validator, MasterAgent(MasterConfig(max_revisions=2)),
        lambda plan, slot: steps.prune_revision(ctx, plan, slot.revision, validator, slot.candidate),
        finetune_batch=lambda items: [steps.finetune_revision(ctx, m, m.revision, m.candidate) for m in items],
        resume_history=resume)
    return ctx, result


def _comparable(r: RevisionRecord) -> dict:
    d = r.model_dump(mode="json", exclude={"timings"})
    for g in d["rungs"]:
        g.pop("seconds")
    return d


def test_rungs_in_the_store_advance_the_best_and_resume_without_redoing(cfg, monkeypatch):
    torch.manual_seed(0)
    ctx, result = _search(cfg)
    tuned = [r for r in result.history if r.accuracy_after is not None]
    assert len({r.revision for r in tuned}) == 2 and len(tuned) >= 4
    for r in tuned:
        assert r.rungs[0].rung == 0 and r.rungs[0].epochs == 1
        assert r.accuracy_after == r.rungs[-1].accuracy
        assert ctx.store.exists(r.checkpoint_key) and r.checkpoint_key == r.rungs[-1].checkpoint_key
    # exactly the promoted ones went on to rung 1 (2 epochs), from their rung-0 weights
    for rev in (0, 1):
        mine = [r for r in tuned if r.revision == rev]
        earlier = [r for r in tuned if r.revision < rev]
        up = promoted({r.candidate: r.rungs[0].accuracy for r in mine}, 0, earlier, cfg.rung_keep)
        assert up and [r.candidate for r in mine if len(r.rungs) == 2] == up
        for r in mine:
            if len(r.rungs) == 2:
                assert r.rungs[1].epochs == 2 and r.checkpoint_key.endswith(".pt") and ".rung" not in r.checkpoint_key
            else:
                assert r.checkpoint_key.endswith(".rung0.pt")
    assert result.best.rung == 1  # the pick is one that got the full inline budget
    assert from_jsonl(to_jsonl(result.history)) == result.history  # rungs survive the JSONL round trip
    # old histories (no rungs) still load
    old = result.history[0].model_dump(mode="json")
    old.pop("rungs")
    assert RevisionRecord(**old).rungs == []

    # a run killed after revision 0 was persisted, with revision 1's steps all done, resumes without redoing any
    def boom(*a, **k):
        raise AssertionError("work was redone")

    monkeypatch.setattr(steps, "_prune", boom)
    monkeypatch.setattr(steps, "finetune", boom)
    steps._CONTEXTS.drop(ctx.run_id)  # a fresh process: nothing cached but the store
    _, again = _search(cfg, resume=[r for r in result.history if r.revision == 0])
    assert [_comparable(r) for r in again.history] == [_comparable(r) for r in result.history]
    assert (again.best.revision, again.best.candidate) == (result.best.revision, result.best.candidate)


def test_memory_steps_continue_the_same_weights_per_rung():
    from tasks.memory_steps import MemorySteps

    calls = []

    def ft(model, epochs):
        calls.append((id(model), epochs))
        return model

    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    from pruning.solver import MacBand
    from pruning.space import count_macs_params

    base, _ = count_macs_params(model, example)
    band = MacBand(target_macs=0.5 * base)
    scores = iter([0.5, 0.9, 0.7, 0.95, 0.8])
    bridge = MemorySteps(model, example, band, lambda m: next(scores, 0.5), finetune=ft,
                         rungs=RungSchedule(epochs=[1, 3], keep=0.5), evaluate_zero_shot=False)
    from agents.search import Measured, finetune_candidates

    items = [bridge.prune_and_measure(PruningPlan(importance="l1", round_to=r)) for r in (8, 4)]
    for i, m in enumerate(items):
        m.candidate = i
    out, _ = finetune_candidates(items, lambda ms: [bridge.finetune_and_evaluate(m) for m in ms],
                                 rungs=bridge.rungs)
    assert [len(out[c].rungs) for c in (0, 1)] == [1, 2]  # 0.5 vs 0.9 at rung 0: candidate 1 advances
    assert [e for _, e in calls] == [1, 1, 2]  # rung 1 adds the 2 epochs between the rungs
    assert calls[2][0] == id(items[1].model)  # on the same (already fine-tuned) module
    assert isinstance(items[0], Measured)
