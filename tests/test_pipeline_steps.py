"""Pipeline steps are idempotent per (revision, candidate): a preempted or retried step never redoes work."""
import pytest

from pruning.plan import PruningPlan
from tasks import steps
from tasks.config import RunConfig


@pytest.fixture()
def ctx(tmp_path):
    cfg = RunConfig(store=str(tmp_path / "store"), model="resnet18", num_classes=10, target_macs="45%",
                    inline_epochs=1, max_train_batches=2, calibration_batches=1, importance="l1", latency=False)
    info = steps.open_run(cfg)
    c = steps.get_context(cfg, info.run_id)
    steps.prepare_original(c)
    return c


def test_prune_and_finetune_are_idempotent_per_candidate(ctx, monkeypatch):
    plan = PruningPlan(importance="l1")
    measured = steps.prune_revision(ctx, plan, 3, candidate=1)
    assert measured.in_band and measured.checkpoint_key.endswith("revisions/r003c1.pruned.pt")
    assert (measured.revision, measured.candidate) == (3, 1)
    evaluated = steps.finetune_revision(ctx, measured, 3, 1)
    assert evaluated.checkpoint_key.endswith("revisions/r003c1.pt")
    assert not ctx.store.exists(measured.checkpoint_key)  # the pre-fine-tuning bundle was cleaned up
    assert any(n.startswith("fine-tuned on ") for n in evaluated.notes)

    def boom(*a, **k):
        raise AssertionError("work was redone")

    monkeypatch.setattr(steps, "_prune", boom)
    monkeypatch.setattr(steps, "finetune", boom)
    # a retried task / resumed run gets the stored results back, without pruning or training again
    again = steps.prune_revision(ctx, plan, 3, candidate=1)
    assert again.model_dump() == measured.model_dump()
    assert steps.finetune_revision(ctx, again, 3, 1).model_dump() == evaluated.model_dump()
    # another plan in the same slot (e.g. a non-deterministic LLM proposal after a resume) is pruned anew
    with pytest.raises(AssertionError, match="redone"):
        steps.prune_revision(ctx, plan.model_copy(update={"round_to": 4}), 3, candidate=1)
    # another candidate of the same revision is its own slot
    with pytest.raises(AssertionError, match="redone"):
        steps.prune_revision(ctx, plan, 3, candidate=0)
