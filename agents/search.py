"""The search loop of Algorithm 2 with pluggable steps.

``run_search`` only coordinates: the Master analyses the history, the strategist proposes, the safety
validator corrects, and two callbacks do the heavy work so an orchestrator (e.g. a Prefect flow) can
wrap each as a task and persist every record (``on_record``)::

    prune_and_measure(plan)        -> Measured    # prune the ORIGINAL model, re-count MACs
    finetune_and_evaluate(measured) -> Evaluated  # only for in-band results (inline fine-tuning)

Resuming: pass the persisted records as ``resume_history``; the loop continues at the next revision
and never redoes a finished one. Given the same history, seed and a deterministic strategist, the
continuation is identical to an uninterrupted run.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pruning.plan import PruningPlan
from pruning.solver import MacBand

from .history import RevisionRecord, check_history, history_dataframe, plan_signature
from .master import MasterAgent
from .profiling import ProfileSummary
from .safety import SafetyValidator
from .schemas import MasterGuidance
from .strategists import HeuristicStrategist, StrategiesExhausted, Strategist, StrategyContext

log = logging.getLogger("agents.search")


class Measured(BaseModel):
    """Result of ``prune_and_measure``: the executed plan and the re-verified MACs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: PruningPlan = Field(description="plan as executed; channel_ratio = solver ratio")
    status: Literal["ok", "infeasible", "error", "rejected"] = "ok"
    error: str | None = None
    solver_ratio: float | None = None
    predicted_macs: float | None = None
    achieved_macs: float | None = None
    params: int | None = None
    error_pct: float | None = None
    in_band: bool = False
    kind_ratios: dict[str, float] = Field(default_factory=dict)
    accuracy_before: float | None = Field(None, description="zero-shot accuracy (fraction), optional")
    checkpoint_key: str | None = Field(None, description="stored pruned model (used when nothing is fine-tuned)")
    checkpoint_sha256: str | None = None
    notes: list[str] = Field(default_factory=list, description="e.g. safety repairs made after solving")
    timings: dict[str, float] = Field(default_factory=dict)
    revision: int | None = Field(None, description="set by run_search before fine-tuning")
    checkpoint_key: str | None = Field(None, description="store key of the pruned bundle (flows pass keys, not modules)")
    checkpoint_sha256: str | None = None
    model: Any = Field(None, exclude=True, description="the pruned nn.Module (never serialised)")


class Evaluated(BaseModel):
    """Result of ``finetune_and_evaluate``."""

    accuracy_after: float | None = None
    accuracy_before: float | None = Field(None, description="overrides Measured.accuracy_before when given")
    checkpoint_key: str | None = None
    checkpoint_sha256: str | None = None
    notes: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


PruneAndMeasure = Callable[[PruningPlan], Measured]
FinetuneAndEvaluate = Callable[[Measured], Evaluated]
OnRecord = Callable[[RevisionRecord], None]


class SearchContext(BaseModel):
    """The problem: MAC band, model profile, base plan, baseline accuracy, seed."""

    band: MacBand
    profile: ProfileSummary
    base_plan: PruningPlan = Field(default_factory=PruningPlan)
    baseline_accuracy: float | None = None
    seed: int = 0
    check_strategist: bool = Field(True, description="call strategist.check() before the first revision")


class SearchResult(BaseModel):
    history: list[RevisionRecord]
    best: RevisionRecord | None
    best_revision: int | None
    best_in_band: bool
    stop_reason: str
    resumed_revisions: int = Field(0, description="records taken from resume_history")
    new_revisions: int = 0
    last_guidance: MasterGuidance | None = None

    def dataframe(self):
        return history_dataframe(self.history)


def run_search(
    context: SearchContext,
    strategist: Strategist,
    validator: SafetyValidator,
    master: MasterAgent,
    prune_and_measure: PruneAndMeasure,
    finetune_and_evaluate: FinetuneAndEvaluate | None = None,
    on_record: OnRecord | None = None,
    resume_history: Sequence[RevisionRecord] = (),
) -> SearchResult:
    """Algorithm 2: revise until the Master stops (two-phase search, early stop, R_max)."""
    profile, band = context.profile, context.band
    history = check_history(list(resume_history))
    resumed = len(history)
    if context.check_strategist:
        strategist.check()
    requested = strategist.name
    heuristic = strategist if isinstance(strategist, HeuristicStrategist) else HeuristicStrategist(limits=validator.limits)
    stop_reason = f"maximum revisions reached ({master.config.max_revisions})"
    guidance: MasterGuidance | None = None

    for r in range(len(history), master.config.max_revisions):
        timings: dict[str, float] = {}
        t = time.perf_counter()
        guidance = master.analyze(history, band, profile, context.baseline_accuracy)
        timings["master"] = time.perf_counter() - t
        if not guidance.continue_search:
            stop_reason = guidance.stop_reason or "master stopped the search"
            break
        ctx = StrategyContext(revision=r, profile=profile, band=band, history=list(history), guidance=guidance,
                              base_plan=context.base_plan, baseline_accuracy=context.baseline_accuracy,
                              seed=context.seed)
        # -- Analysis Agent --------------------------------------------------------------------
        t = time.perf_counter()
        try:
            proposal = strategist.propose(ctx)
        except StrategiesExhausted as exc:
            stop_reason = str(exc)
            break
        except Exception as exc:  # noqa: BLE001 - a strategist bug must not end the search
            if strategist is heuristic:
                raise
            log.warning("strategist %s failed: %s", requested, exc)
            try:
                proposal = heuristic.propose(ctx).model_copy(
                    update={"fallback_reason": f"strategist error: {type(exc).__name__}: {str(exc)[:200]}"})
            except StrategiesExhausted as exc2:
                stop_reason = str(exc2)
                break
        timings["propose"] = time.perf_counter() - t

        # -- Safety validation --------------------------------------------------------------
        t = time.perf_counter()
        verdict = validator.validate(proposal, profile, history, guidance=guidance, base_plan=context.base_plan,
                                     band=band)
        seen = _seen(history, profile)
        sig = plan_signature(verdict.plan, profile.stages, profile.kinds)
        if sig in seen and proposal.strategist != heuristic.name:
            dup_of = seen[sig]
            try:
                alt = heuristic.propose(ctx)
            except StrategiesExhausted as exc:
                stop_reason = f"no new plan: proposal repeats revision {dup_of} and {exc}"
                break
            proposal = alt.model_copy(update={
                "fallback_reason": (proposal.fallback_reason + "; " if proposal.fallback_reason else "")
                + f"validated plan duplicates revision {dup_of} (already executed)",
                "raw_reply": proposal.raw_reply, "notes": proposal.notes + alt.notes})
            verdict = validator.validate(proposal, profile, history, guidance=guidance, base_plan=context.base_plan,
                                         band=band)
            sig = plan_signature(verdict.plan, profile.stages, profile.kinds)
        if sig in seen:
            stop_reason = f"no new plan: the validated plan repeats revision {seen[sig]}"
            break
        timings["validate"] = time.perf_counter() - t

        # -- Prune the original model, re-count MACs ----------------------------------------
        t = time.perf_counter()
        measured = prune_and_measure(verdict.plan)
        timings["prune"] = time.perf_counter() - t
        measured.revision = r
        reasons = list(verdict.reasons) + list(measured.notes)
        status = measured.status
        post = validator.check_kind_ratios(measured.kind_ratios, profile.family) if status == "ok" else []
        if post:
            status = "rejected"
            reasons += [f"post-solve check: {p}" for p in post]
        verdict_status = verdict.status
        if verdict_status == "accepted" and (measured.notes or post):
            verdict_status = "clamped" if not post else "rejected"
        # -- Inline fine-tuning for in-band candidates --------------------------------------
        evaluated = None
        if finetune_and_evaluate is not None and status == "ok" and measured.in_band:
            t = time.perf_counter()
            evaluated = finetune_and_evaluate(measured)
            timings["finetune"] = time.perf_counter() - t
        measured.model = None  # release the pruned model
        acc_before = measured.accuracy_before
        if evaluated is not None and evaluated.accuracy_before is not None:
            acc_before = evaluated.accuracy_before
        record = RevisionRecord(
            revision=r, strategist=requested, strategist_used=proposal.strategist, raw_reply=proposal.raw_reply,
            fallback_reason=proposal.fallback_reason, strategy=proposal.strategy.model_dump(mode="json"),
            proposal_notes=proposal.notes + (evaluated.notes if evaluated else []),
            parent_revision=proposal.parent_revision, move=proposal.move, guidance_action=guidance.recommended_action,
            verdict=verdict_status, verdict_reasons=reasons, proposed_plan=proposal.plan, signature=sig,
            plan=measured.plan, status=status, error=measured.error, solver_ratio=measured.solver_ratio,
            predicted_macs=measured.predicted_macs, achieved_macs=measured.achieved_macs, params=measured.params,
            error_pct=measured.error_pct, in_band=measured.in_band, kind_ratios=measured.kind_ratios,
            accuracy_before=acc_before, accuracy_after=evaluated.accuracy_after if evaluated else None,
            checkpoint_key=(evaluated.checkpoint_key if evaluated and evaluated.checkpoint_key else measured.checkpoint_key),
            checkpoint_sha256=(evaluated.checkpoint_sha256 if evaluated and evaluated.checkpoint_key
                               else measured.checkpoint_sha256),
            timings={**timings, **{f"prune.{k}": v for k, v in measured.timings.items()},
                     **({f"finetune.{k}": v for k, v in evaluated.timings.items()} if evaluated else {})},
        )
        record.collapsed = master.is_collapsed(record.accuracy, context.baseline_accuracy)
        history.append(record)
        log.info("revision %d: %s %s MACs err %s%% acc %s", r, record.status, record.achieved_macs,
                 None if record.error_pct is None else round(record.error_pct, 2), record.accuracy)
        if on_record is not None:
            on_record(record)
    else:
        guidance = master.analyze(history, band, profile, context.baseline_accuracy) if history else guidance
        if guidance is not None and not guidance.continue_search and guidance.stop_reason:
            stop_reason = guidance.stop_reason

    best = master.select_best(history)
    return SearchResult(
        history=history, best=best, best_revision=best.revision if best else None,
        best_in_band=bool(best is not None and best.is_candidate), stop_reason=stop_reason,
        resumed_revisions=resumed, new_revisions=len(history) - resumed, last_guidance=guidance,
    )


def _seen(history: Sequence[RevisionRecord], profile: ProfileSummary) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in history:
        for s in (r.signature, plan_signature(r.plan, profile.stages, profile.kinds)):
            if s and s not in out:
                out[s] = r.revision
    return out

