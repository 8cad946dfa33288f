"""The search loop of Algorithm 2 with pluggable steps.

``run_search`` only coordinates: the Master analyses the history, the strategist proposes, the safety
validator corrects, and two callbacks do the heavy work so an orchestrator (e.g. a Prefect flow) can
wrap each as a task and persist every record (``on_record``)::

    prune_and_measure(plan, slot)   -> Measured    # prune the ORIGINAL model, re-count MACs
    finetune_and_evaluate(measured) -> Evaluated   # only for in-band results (inline fine-tuning)
    finetune_batch([measured, ...]) -> [Evaluated] # optional: the K candidates of a revision at once

Multi-fidelity selection (``SearchContext.rungs``, a :class:`RungSchedule`): the in-band candidates are
fine-tuned in successive-halving rungs, a short budget for all, more for the best fraction (ranked against
every result at that rung in the run, so the revisions of a run compete too), the full inline budget for
the few that remain; each call of ``finetune_batch`` is one rung (``Measured.rung``), a survivor continuing
from its previous rung's weights, and every rung is recorded (``RevisionRecord.rungs``).

Resuming: pass the persisted records as ``resume_history``; the loop continues at the next revision
and never redoes a finished one. Given the same history, seed and a deterministic strategist, the
continuation is identical to an uninterrupted run.

One revision, step by step (what ``run_search`` does, for an orchestrator that drives the loop itself)::

    step = propose_revision(r, history, context, strategist, validator, master)   # Master + Analysis + Safety
    if step.stop_reason: ...                                                         # the search ends here
    to_finetune = prune_candidates(step, history, context, validator, prune_and_measure)
    evaluated, seconds = finetune_candidates(to_finetune, finetune_batch,          # one batch per rung
                                             rungs=context.rungs, history=history)
    records = record_revision(step, evaluated, seconds, master, context)            # append, persist
    ...
    result = finish_search(history, master, context, resumed=..., guidance=..., stop_reason=...)
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from agents.history import (
    DUPLICATE_PREFIX,
    RevisionRecord,
    RungResult,
    check_history,
    history_dataframe,
    plan_signature,
)
from agents.llm_client import LLMUnavailable
from agents.master import MasterAgent
from agents.profiling import ProfileSummary
from agents.safety import SafetyValidator, Verdict
from agents.schemas import MasterGuidance
from agents.strategists import HeuristicStrategist, Proposal, StrategiesExhausted, Strategist, StrategyContext
from pruning.plan import PruningPlan
from pruning.solver import MacBand

__all__ = ["Measured", "Evaluated", "Slot", "SearchContext", "SearchResult", "Candidate", "RevisionStep", "RungSchedule",
           "promoted",
           "run_search", "next_revision", "fallback_heuristic", "propose_revision", "prune_candidates",
           "finetune_candidates", "record_revision", "finish_search"]

log = logging.getLogger(__name__)


class Measured(BaseModel):
    """Result of ``prune_and_measure``: the executed plan and the re-verified MACs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: PruningPlan = Field(description="plan as executed; channel_ratio = solver ratio")
    status: Literal["ok", "infeasible", "error", "rejected"] = "ok"
    error: str | None = None
    solver_ratio: float | None = None
    allocation_digest: str | None = Field(None, description="Solution.digest(): equal digests = the same pruned model")
    predicted_macs: float | None = None
    achieved_macs: float | None = None
    params: int | None = None
    error_pct: float | None = None
    in_band: bool = False
    kind_ratios: dict[str, float] = Field(default_factory=dict)
    accuracy_before: float | None = Field(None, description="zero-shot accuracy (fraction), optional")
    checkpoint_key: str | None = Field(None, description="store key of the pruned bundle (flows pass keys, not modules)")
    checkpoint_sha256: str | None = None
    notes: list[str] = Field(default_factory=list, description="e.g. safety repairs made after solving")
    timings: dict[str, float] = Field(default_factory=dict)
    revision: int | None = Field(None, description="set by run_search before fine-tuning")
    candidate: int = Field(0, description="candidate index within the revision, set by run_search")
    rung: int = Field(0, ge=0, description="successive-halving rung to fine-tune (0 = from the pruned weights; "
                      "k > 0 continues from rung k-1's weights in checkpoint_key / model)")
    model: Any = Field(None, exclude=True, description="the pruned nn.Module (never serialised)")


class Evaluated(BaseModel):
    """Result of ``finetune_and_evaluate``."""

    accuracy_after: float | None = None
    accuracy_before: float | None = Field(None, description="overrides Measured.accuracy_before when given")
    checkpoint_key: str | None = None
    checkpoint_sha256: str | None = None
    notes: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    rung: int = Field(0, ge=0, description="the rung this result is for")
    epochs: float | None = Field(None, description="cumulative inline fine-tuning epochs behind this result")
    rungs: list[RungResult] = Field(default_factory=list, description="every rung behind this result (filled by "
                                    "finetune_candidates)")


class RungSchedule(BaseModel):
    """Successive halving of inline fine-tuning: cumulative epochs per rung and the fraction that advances.

    Rung 0 fine-tunes every in-band candidate for ``epochs[0]``; after each rung the candidates whose
    validation accuracy ranks in the top ``keep`` fraction of every result at that rung so far (this
    revision's and the earlier revisions', as in asynchronous successive halving) continue from their
    weights up to the next rung's epochs. One rung = every candidate gets the full inline budget.
    """

    epochs: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                description="cumulative inline epochs at the end of each rung, increasing")
    keep: float = Field(0.5, gt=0, le=1, description="fraction of results at a rung that advance to the next")

    @classmethod
    def from_fractions(cls, fractions: Sequence[float], inline_epochs: int, keep: float = 0.5) -> "RungSchedule":
        """Rungs as fractions of ``inline_epochs`` (whole epochs, at least 1 each); ``[1.0]`` = one rung."""
        if inline_epochs <= 0:
            return cls(epochs=[0.0], keep=keep)
        epochs = [float(max(1, round(f * inline_epochs))) for f in fractions]
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"rungs {list(fractions)} of {inline_epochs} inline epoch(s) give epochs {epochs}, "
                             "which do not increase: use fewer rungs or more inline epochs")
        return cls(epochs=epochs, keep=keep)

    @property
    def n(self) -> int:
        return len(self.epochs)

    def start(self, rung: int) -> float:
        """Epochs already done when ``rung`` starts."""
        return self.epochs[rung - 1] if rung > 0 else 0.0


def promoted(scores: dict[int, float | None], rung: int, history: Sequence[RevisionRecord], keep: float) -> list[int]:
    """The candidates (keys of ``scores``: their accuracy at ``rung``) that advance to the next rung: those at or
    above the ``ceil(keep * n)``-th best of the n results at this rung (earlier records' ones included)."""
    pool = [r.rungs[rung].accuracy for r in history if len(r.rungs) > rung and r.rungs[rung].accuracy is not None]
    mine = [s for s in scores.values() if s is not None]
    if not mine:  # nothing to rank them by (no evaluator): everyone advances
        return sorted(scores)
    pool += mine
    n_keep = max(1, math.ceil(keep * len(pool)))
    threshold = sorted(pool, reverse=True)[n_keep - 1]
    return sorted(c for c, s in scores.items() if s is not None and s >= threshold)


class Slot(BaseModel):
    """Where a candidate sits in the search: revision r, candidate c of that revision."""

    revision: int = Field(ge=0)
    candidate: int = Field(0, ge=0)


PruneAndMeasure = Callable[[PruningPlan, Slot], Measured]
FinetuneAndEvaluate = Callable[[Measured], Evaluated]
FinetuneBatch = Callable[[list[Measured]], list[Evaluated]]
OnRecord = Callable[[RevisionRecord], None]


class SearchContext(BaseModel):
    """The problem: MAC band, model profile, base plan, baseline accuracy, seed."""

    band: MacBand
    profile: ProfileSummary
    base_plan: PruningPlan = Field(default_factory=PruningPlan)
    baseline_accuracy: float | None = None
    seed: int = 0
    candidates_per_revision: int = Field(1, ge=1, le=64, description="K shapes proposed and evaluated per revision")
    check_strategist: bool = Field(True, description="call strategist.check() before the first revision")
    rungs: RungSchedule | None = Field(None, description="successive-halving rungs of inline fine-tuning "
                                       "(None = one rung: every in-band candidate gets the full budget)")


class SearchResult(BaseModel):
    history: list[RevisionRecord]
    best: RevisionRecord | None
    best_revision: int | None
    best_candidate: int | None = None
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
    finetune_batch: FinetuneBatch | None = None,
) -> SearchResult:
    """Algorithm 2: revise until the Master stops (two-phase search, early stop, R_max).

    Each revision proposes ``context.candidates_per_revision`` (K) shapes; every one is validated and
    pruned in turn, then the in-band ones are fine-tuned together by ``finetune_batch`` (default:
    ``finetune_and_evaluate`` one after another), so an orchestrator can run them in parallel. The
    Master sees all K records before the next revision. A revision interrupted after some of its
    candidates were recorded is completed on resume without redoing those.
    """
    history = check_history(list(resume_history))
    resumed = len(history)
    if context.check_strategist:
        strategist.check()
    heuristic = fallback_heuristic(strategist, validator)
    if finetune_batch is None and finetune_and_evaluate is not None:
        def finetune_batch(items: list[Measured]) -> list[Evaluated]:
            return [finetune_and_evaluate(m) for m in items]
    guidance: MasterGuidance | None = None
    stop_reason: str | None = None
    r = next_revision(history, context.candidates_per_revision)
    while r < master.config.max_revisions:
        step = propose_revision(r, history, context, strategist, validator, master, heuristic=heuristic)
        guidance = step.guidance
        if step.stop_reason is not None:
            stop_reason = step.stop_reason
            break
        if step.candidates:  # none: an interrupted revision whose remaining candidates cannot be proposed any more
            to_finetune = prune_candidates(step, history, context, validator, prune_and_measure,
                                           finetune=finetune_batch is not None)
            evaluated, batch_seconds = finetune_candidates(to_finetune, finetune_batch, rungs=context.rungs,
                                                           history=history)
            for record in record_revision(step, evaluated, batch_seconds, master, context):
                history.append(record)
                log.info("revision %d.%d: %s %s MACs err %s%% acc %s", r, record.candidate, record.status,
                         record.achieved_macs, None if record.error_pct is None else round(record.error_pct, 2),
                         record.accuracy)
                if on_record is not None:
                    on_record(record)
        r += 1
    return finish_search(history, master, context, resumed=resumed, guidance=guidance, stop_reason=stop_reason)


class Candidate:
    """One proposal of a revision on its way to a record: proposal, verdict, signature, then measurement."""

    def __init__(self, proposal: Proposal, verdict: Verdict, signature: str):
        self.proposal, self.verdict, self.signature = proposal, verdict, signature
        self.candidate = 0
        self.timings: dict[str, float] = {}
        self.measured: Measured | None = None
        self.post: list[str] = []


class RevisionStep:
    """One revision r on its way to records: the Master's guidance and the validated candidates.

    ``recorded`` holds the candidates recorded before an interruption (resume); ``stop_reason`` is set
    when the search ends at this revision (the Master stopped it, or no new plan is left).
    """

    def __init__(self, revision: int, guidance: MasterGuidance, requested: str,
                 recorded: dict[int, RevisionRecord] | None = None):
        self.revision, self.guidance, self.requested = revision, guidance, requested
        self.recorded: dict[int, RevisionRecord] = recorded or {}
        self.candidates: list[Candidate] = []
        self.stop_reason: str | None = None


def next_revision(history: Sequence[RevisionRecord], k_max: int) -> int:
    """Where a (resumed) search continues: the last revision again when it has fewer than K records."""
    if not history:
        return 0
    last = max(h.revision for h in history)
    n_last = sum(1 for h in history if h.revision == last)
    return last if n_last < k_max else last + 1


def fallback_heuristic(strategist: Strategist, validator: SafetyValidator) -> HeuristicStrategist:
    """The strategist that answers when ``strategist`` fails or repeats a plan (itself when it is heuristic)."""
    if isinstance(strategist, HeuristicStrategist):
        return strategist
    return HeuristicStrategist(limits=validator.limits)


def propose_revision(revision: int, history: Sequence[RevisionRecord], context: SearchContext,
                     strategist: Strategist, validator: SafetyValidator, master: MasterAgent, *,
                     heuristic: HeuristicStrategist | None = None) -> RevisionStep:
    """Master Agent + Analysis Agent + Safety validator for revision ``revision``: the K candidates still
    missing from ``history`` (validated, new plans), or a ``stop_reason``."""
    profile, r = context.profile, revision
    prior = [h for h in history if h.revision < r]
    done = {h.candidate: h for h in history if h.revision == r}
    t = time.perf_counter()
    guidance = master.analyze(prior, context.band, profile, context.baseline_accuracy)
    master_seconds = time.perf_counter() - t
    step = RevisionStep(r, guidance, strategist.name, done)
    if not guidance.continue_search:
        step.stop_reason = guidance.stop_reason or "master stopped the search"
        return step
    heuristic = heuristic or fallback_heuristic(strategist, validator)
    seen = _seen(prior, profile)
    for h in done.values():
        seen.setdefault(h.signature or plan_signature(h.plan, profile.stages, profile.kinds), r)
    pending = [h.proposed_plan or h.plan for _, h in sorted(done.items())]
    exhausted: str | None = None
    for c in range(context.candidates_per_revision):
        if c in done:
            continue
        ctx = StrategyContext(revision=r, profile=profile, band=context.band, history=list(prior), guidance=guidance,
                              base_plan=context.base_plan, baseline_accuracy=context.baseline_accuracy,
                              seed=context.seed, candidate=c, pending=list(pending))
        cand, exhausted = _propose_candidate(ctx, strategist, heuristic, validator, context, seen, step.requested)
        if cand is None:
            break
        cand.candidate = c
        cand.timings["master"] = master_seconds
        seen[cand.signature] = r
        pending.append(cand.proposal.plan)
        step.candidates.append(cand)
    if not step.candidates and not done:
        step.stop_reason = exhausted or "no new plan"
    return step


def prune_candidates(step: RevisionStep, history: Sequence[RevisionRecord], context: SearchContext,
                     validator: SafetyValidator, prune_and_measure: PruneAndMeasure, *,
                     finetune: bool = True) -> list[Measured]:
    """Prune the original model for each candidate (cheap: one solve + one prune), re-count MACs, check the
    solved ratios; a candidate whose solved allocation equals an earlier one is rejected as a duplicate.
    Returns the candidates to fine-tune (ok, in band, safe; none unless ``finetune``)."""
    r = step.revision
    to_finetune: list[Measured] = []
    solved = {h.allocation_digest: (h.revision, h.candidate) for h in history
              if h.allocation_digest and h.status == "ok"}
    for cand in step.candidates:
        t = time.perf_counter()
        measured = prune_and_measure(cand.verdict.plan, Slot(revision=r, candidate=cand.candidate))
        cand.timings["prune"] = time.perf_counter() - t
        measured.revision, measured.candidate = r, cand.candidate
        cand.measured = measured
        post = (validator.check_kind_ratios(measured.kind_ratios, context.profile.family)
                if measured.status == "ok" else [])
        cand.post = post
        twin = solved.get(measured.allocation_digest) if measured.status == "ok" else None
        if twin is not None:  # another shape that solved to the very same channel counts: nothing new to learn
            measured.status = "rejected"
            measured.error = (f"{DUPLICATE_PREFIX} the solved allocation equals revision {twin[0]} candidate "
                              f"{twin[1]}; not fine-tuned again")
            continue
        if measured.status == "ok" and measured.allocation_digest:
            solved[measured.allocation_digest] = (r, cand.candidate)
        if finetune and measured.status == "ok" and measured.in_band and not post:
            to_finetune.append(measured)
    return to_finetune


def finetune_candidates(to_finetune: list[Measured], finetune_batch: FinetuneBatch | None, *,
                        rungs: RungSchedule | None = None, history: Sequence[RevisionRecord] = (),
                        ) -> tuple[dict[int, Evaluated], float]:
    """Inline fine-tuning of a revision's in-band candidates, one batch per rung (in parallel when the
    orchestrator can): ``(candidate index -> its last rung's Evaluated, wall seconds of all batches)``.

    With several ``rungs`` (successive halving) each batch gets the :class:`Measured` with ``rung`` set; a
    survivor's ``checkpoint_key`` / ``model`` point at its previous rung's weights, and :func:`promoted`
    (on ``history`` and this revision's scores, so a resumed revision advances the same candidates) decides
    who continues. Each result lists the rungs behind it in ``Evaluated.rungs`` (empty without ``rungs``).
    """
    if not to_finetune or finetune_batch is None:
        return {}, 0.0
    schedule = rungs or RungSchedule()
    t = time.perf_counter()
    out: dict[int, Evaluated] = {}
    active = list(to_finetune)
    for k in range(schedule.n):
        items = [m.model_copy(update={"rung": k}) for m in active]
        results = finetune_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"finetune_batch returned {len(results)} results for {len(items)} candidates")
        for m, e in zip(items, results):
            prior = out.get(m.candidate)
            done = RungResult(rung=k, epochs=schedule.epochs[k], accuracy=e.accuracy_after,
                              checkpoint_key=e.checkpoint_key, checkpoint_sha256=e.checkpoint_sha256,
                              seconds=round(sum(e.timings.values()), 4))
            out[m.candidate] = e.model_copy(update={
                "rung": k, "epochs": schedule.epochs[k] if rungs is not None else e.epochs,
                "rungs": (prior.rungs if prior is not None else []) + [done] if rungs is not None else []})
        if k == schedule.n - 1:
            break
        up = set(promoted({m.candidate: out[m.candidate].accuracy_after for m in items}, k, history, schedule.keep))
        active = [m.model_copy(update={"checkpoint_key": out[m.candidate].checkpoint_key or m.checkpoint_key,
                                       "checkpoint_sha256": (out[m.candidate].checkpoint_sha256
                                                             if out[m.candidate].checkpoint_key else m.checkpoint_sha256)})
                  for m in items if m.candidate in up]
        if not active:
            break
    return out, time.perf_counter() - t


def record_revision(step: RevisionStep, evaluated: dict[int, Evaluated], batch_seconds: float,
                    master: MasterAgent, context: SearchContext) -> list[RevisionRecord]:
    """One :class:`RevisionRecord` per pruned candidate of ``step``, in candidate order (not yet in the history)."""
    return [_record(cand, evaluated.get(cand.candidate), batch_seconds, step.revision, step.requested,
                    step.guidance, master, context) for cand in step.candidates]


def finish_search(history: Sequence[RevisionRecord], master: MasterAgent, context: SearchContext, *,
                  resumed: int = 0, guidance: MasterGuidance | None = None,
                  stop_reason: str | None = None) -> SearchResult:
    """The result: history sorted by slot and the best record. ``stop_reason=None`` (the loop ran out of
    revisions): R_max, unless the Master's final analysis of the whole history stops for another reason."""
    if stop_reason is None:
        stop_reason = f"maximum revisions reached ({master.config.max_revisions})"
        if history:
            guidance = master.analyze(history, context.band, context.profile, context.baseline_accuracy)
            if not guidance.continue_search and guidance.stop_reason:
                stop_reason = guidance.stop_reason
    history = sorted(history, key=lambda h: (h.revision, h.candidate))
    best = master.select_best(history)
    return SearchResult(
        history=history, best=best, best_revision=best.revision if best else None,
        best_candidate=best.candidate if best else None,
        best_in_band=bool(best is not None and best.is_candidate), stop_reason=stop_reason,
        resumed_revisions=resumed, new_revisions=len(history) - resumed, last_guidance=guidance,
    )


def _propose_candidate(ctx: StrategyContext, strategist: Strategist, heuristic: HeuristicStrategist,
                       validator: SafetyValidator, context: SearchContext, seen: dict[str, int],
                       requested: str) -> tuple[Candidate | None, str | None]:
    """Analysis Agent + Safety validator for one candidate; (None, why) when no new plan is left."""
    profile, band, guidance = ctx.profile, ctx.band, ctx.guidance
    t = time.perf_counter()
    try:
        proposal = strategist.propose(ctx)
    except StrategiesExhausted as exc:
        return None, str(exc)
    except LLMUnavailable:  # the LLM failed and falling back is disabled: the run stops, as asked
        raise
    except Exception as exc:  # noqa: BLE001 - a strategist bug must not end the search
        if strategist is heuristic:
            raise
        log.warning("strategist %s failed: %s", requested, exc)
        try:
            proposal = heuristic.propose(ctx).model_copy(
                update={"fallback_reason": f"strategist error: {type(exc).__name__}: {str(exc)[:200]}"})
        except StrategiesExhausted as exc2:
            return None, str(exc2)
    propose_seconds = time.perf_counter() - t
    t = time.perf_counter()
    verdict = validator.validate(proposal, profile, ctx.history, guidance=guidance, base_plan=context.base_plan,
                                 band=band)
    sig = plan_signature(verdict.plan, profile.stages, profile.kinds)
    if sig in seen and proposal.strategist != heuristic.name:
        dup_of = _where(seen[sig], ctx)
        try:
            alt = heuristic.propose(ctx)
        except StrategiesExhausted as exc:
            return None, f"no new plan: proposal repeats {dup_of} and {exc}"
        proposal = alt.model_copy(update={
            "fallback_reason": (proposal.fallback_reason + "; " if proposal.fallback_reason else "")
            + f"validated plan duplicates {dup_of} (already executed)",
            "raw_reply": proposal.raw_reply, "notes": proposal.notes + alt.notes})
        verdict = validator.validate(proposal, profile, ctx.history, guidance=guidance, base_plan=context.base_plan,
                                     band=band)
        sig = plan_signature(verdict.plan, profile.stages, profile.kinds)
    if sig in seen:
        return None, f"no new plan: the validated plan repeats {_where(seen[sig], ctx)}"
    cand = Candidate(proposal, verdict, sig)
    cand.timings.update(propose=propose_seconds, validate=time.perf_counter() - t)
    return cand, None


def _where(revision: int, ctx: StrategyContext) -> str:
    return f"revision {revision}" if revision != ctx.revision else f"another candidate of revision {revision}"


def _record(cand: Candidate, evaluated: Evaluated | None, batch_seconds: float, r: int, requested: str,
            guidance: MasterGuidance, master: MasterAgent, context: SearchContext) -> RevisionRecord:
    proposal, verdict, measured = cand.proposal, cand.verdict, cand.measured
    reasons = list(verdict.reasons) + list(measured.notes)
    status = measured.status
    if status == "ok" and cand.post:
        status = "rejected"
        reasons += [f"post-solve check: {p}" for p in cand.post]
    verdict_status = verdict.status
    if verdict_status == "accepted" and (measured.notes or cand.post):
        verdict_status = "clamped" if not cand.post else "rejected"
    measured.model = None  # release the pruned model
    acc_before = measured.accuracy_before
    if evaluated is not None and evaluated.accuracy_before is not None:
        acc_before = evaluated.accuracy_before
    timings = dict(cand.timings)
    if evaluated is not None:  # wall seconds of the revision's fine-tuning batch (shared by its candidates)
        timings["finetune"] = batch_seconds
    record = RevisionRecord(
        revision=r, candidate=cand.candidate, strategist=requested, strategist_used=proposal.strategist,
        raw_reply=proposal.raw_reply, fallback_reason=proposal.fallback_reason,
        strategy=proposal.strategy.model_dump(mode="json"),
        proposal_notes=proposal.notes + (evaluated.notes if evaluated else []),
        parent_revision=proposal.parent_revision, move=proposal.move, guidance_action=guidance.recommended_action,
        verdict=verdict_status, verdict_reasons=reasons, proposed_plan=proposal.plan, signature=cand.signature,
        plan=measured.plan, status=status, error=measured.error, solver_ratio=measured.solver_ratio,
        allocation_digest=measured.allocation_digest,
        predicted_macs=measured.predicted_macs, achieved_macs=measured.achieved_macs, params=measured.params,
        error_pct=measured.error_pct, in_band=measured.in_band, kind_ratios=measured.kind_ratios,
        accuracy_before=acc_before, accuracy_after=evaluated.accuracy_after if evaluated else None,
        rungs=list(evaluated.rungs) if evaluated else [],
        checkpoint_key=(evaluated.checkpoint_key if evaluated and evaluated.checkpoint_key else measured.checkpoint_key),
        checkpoint_sha256=(evaluated.checkpoint_sha256 if evaluated and evaluated.checkpoint_key
                           else measured.checkpoint_sha256),
        timings={**timings, **{f"prune.{k}": v for k, v in measured.timings.items()},
                 **({f"finetune.{k}": v for k, v in evaluated.timings.items()} if evaluated else {})},
    )
    stopped_early = bool(record.rungs) and context.rungs is not None and record.rung < context.rungs.n - 1
    # a candidate stopped at an early rung was fine-tuned less: its accuracy says little about collapse
    record.collapsed = not stopped_early and master.is_collapsed(record.accuracy, context.baseline_accuracy)
    return record


def _seen(history: Sequence[RevisionRecord], profile: ProfileSummary) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in history:
        for s in (r.signature, plan_signature(r.plan, profile.stages, profile.kinds)):
            if s and s not in out:
                out[s] = r.revision
    return out
