"""Agent-guided iterative pruning of a causal LM ("LLMs can Compress LLMs", adapted).

Each iteration the strategist sees the sensitivity profile (Wanda and gradient z-scores per prunable
linear), the current per-layer sparsities and the history of its own decisions with their outcomes
(self-reflection), and answers a :class:`PruneDecision`: which layers to prune further and by how much.
The loop applies it (Wanda, per output row, incremental masks), measures validation perplexity and rolls
the step back *exactly* (stored removed values) when perplexity rose by more than
``rollback_threshold`` relative to the last accepted state; the next prompt says why. It stops when the
overall sparsity of the prunable linears reaches the target.

Strategists (same pattern as :mod:`agents.strategists`):

* ``heuristic`` (:class:`HeuristicPruneStrategist`, deterministic, offline default);
* ``llm`` (:class:`LLMPruneStrategist`, any OpenAI-compatible endpoint configured by
  :class:`agents.llm_client.LLMConfig`); replies are parsed as JSON and validated, never executed;
  invalid replies are re-asked with the validation error, then the heuristic answers and the reason is
  recorded in the iteration record (``fallback_reason``).

Plain Python: :class:`PruneAgentLoop` exposes ``propose`` / ``execute`` so a flow can wrap each in a
task, and :func:`run_prune_agent` runs the whole loop with ``on_record`` callbacks.
"""
from __future__ import annotations

import abc
import logging
import math
import time
from typing import Any, Callable, ClassVar, Sequence

from agents.llm_client import LLMClient, LLMConfig
from agents.llm_pruning.prompts import prune_reask_prompt, prune_system_prompt, prune_user_prompt
from agents.llm_pruning.schemas import (
    AgentResult,
    AgentState,
    IterationRecord,
    LayerIncrease,
    LLMPruneConfig,
    PruneDecision,
    PruneProposal,
)
from pruning.errors import UserError
from pruning.llm.masks import PruneStep
from pruning.llm.session import PruneSession
from pruning.llm.stats import SensitivityProfile, zscores
from pruning.llm.wanda import parse_nm, row_count, select_prune_indices, wanda_scores

log = logging.getLogger(__name__)

__all__ = ["PruneStrategist", "HeuristicPruneStrategist", "LLMPruneStrategist", "create_prune_strategist",
           "PruneAgentLoop", "run_prune_agent"]


# ------------------------------------------------------------------------------------------------
# Strategists
# ------------------------------------------------------------------------------------------------
class PruneStrategist(abc.ABC):
    name: ClassVar[str] = "base"

    def check(self) -> None:
        return None

    @abc.abstractmethod
    def propose(self, state: AgentState) -> PruneProposal: ...


def _eligible(state: AgentState) -> list[str]:
    cap = state.config.max_layer_sparsity
    nm = parse_nm(state.config.nm)
    if nm is not None:
        cap = min(cap, nm[0] / nm[1])
    return [l.name for l in state.profile.layers if state.layer_sparsities.get(l.name, 0.0) < cap - 1e-6]


class HeuristicPruneStrategist(PruneStrategist):
    """Deterministic strategist: profile-guided allocation, corrected by the outcomes of past steps.

    1. *Desired allocation*: ``s*_l = target - spread * z_l`` with ``z_l`` the layer's importance z
       (:meth:`importance`: z-scores of log Wanda and log gradient score, weighted 1:3, clipped to +-2.5)
       plus a per-layer penalty learned from history, shifted so the parameter-weighted mean is the target
       (bisection) and clamped to ``[0, max_layer_sparsity]``. Important layers (high z) end up less
       sparse than unimportant ones. The defaults (log scores, gradient weight 0.75, spread 0.1) were
       chosen on the embedded model's *validation* perplexity at 45 % / 60 % among a handful of
       variants; the plain profile z (``log_scores=False, grad_weight=0.5``) was worse there, and
       Wanda-only z clearly worse (the mean Wanda score mostly reflects each layer's input scale).
    2. *Self-reflection*: every layer of a rolled-back step gets ``+rollback_penalty`` and is skipped for
       ``cooldown`` iterations; an accepted step whose cost (log-perplexity rise per point of overall
       sparsity) exceeds 1.5x the running mean adds ``+cost_penalty`` to its layers, one below 0.67x
       removes it (floor -1).
    3. *Step*: the ``k`` layers furthest below their desired sparsity get ``min(gap, step)``; the step
       halves after each consecutive rollback and shrinks near the target (``<= 2 x remaining``).
    """

    name = "heuristic"

    def __init__(self, *, spread: float = 0.10, step: float = 0.08, min_step: float = 0.01,
                 layers_fraction: float = 0.25, rollback_penalty: float = 0.75, cost_penalty: float = 0.25,
                 cooldown: int = 2, z_clip: float = 2.5, grad_weight: float = 0.75, log_scores: bool = True):
        self.spread, self.step, self.min_step = spread, step, min_step
        self.grad_weight, self.log_scores = grad_weight, log_scores
        self.layers_fraction, self.rollback_penalty, self.cost_penalty = layers_fraction, rollback_penalty, cost_penalty
        self.cooldown, self.z_clip = cooldown, z_clip

    def importance(self, profile: SensitivityProfile) -> dict[str, float]:
        """Per-layer importance z from the profile's Wanda and gradient scores.

        With ``log_scores`` the z-scores are taken of the logarithms (both scores are positive and
        heavy-tailed: one layer with a 10x gradient score would otherwise squash every other layer to
        about the same z), and the gradient score gets ``grad_weight``. ``log_scores=False,
        grad_weight=0.5`` is the profile's own ``z_combined``.
        """
        layers = profile.layers
        if self.log_scores:
            zw = zscores([math.log(max(l.wanda, 1e-30)) for l in layers])
            zg = zscores([math.log(max(l.grad, 1e-30)) for l in layers])
        else:
            zw, zg = [l.z_wanda for l in layers], [l.z_grad for l in layers]
        g = self.grad_weight
        return {l.name: (1 - g) * zw[i] + g * zg[i] for i, l in enumerate(layers)}

    # -- reflection -------------------------------------------------------------------------------
    def penalties(self, history: Sequence[IterationRecord]) -> dict[str, float]:
        adj: dict[str, float] = {}
        mean_cost: float | None = None
        for r in history:
            if not r.applied:
                continue
            if r.rolled_back:
                for n in r.applied:
                    adj[n] = adj.get(n, 0.0) + self.rollback_penalty
                continue
            if not r.accepted or r.ppl_after is None or r.sparsity_after <= r.sparsity_before:
                continue
            cost = math.log(max(r.ppl_after, 1e-12) / max(r.ppl_before, 1e-12)) / (
                100 * (r.sparsity_after - r.sparsity_before))
            if mean_cost is not None and mean_cost > 0:
                if cost > 1.5 * mean_cost:
                    for n in r.applied:
                        adj[n] = adj.get(n, 0.0) + self.cost_penalty
                elif cost < 0.67 * mean_cost:
                    for n in r.applied:
                        adj[n] = max(-1.0, adj.get(n, 0.0) - self.cost_penalty)
            mean_cost = cost if mean_cost is None else 0.7 * mean_cost + 0.3 * max(cost, 0.0)
        return adj

    def desired(self, state: AgentState, adj: dict[str, float] | None = None) -> dict[str, float]:
        adj = adj if adj is not None else self.penalties(state.history)
        cap = state.config.max_layer_sparsity
        target = state.config.target_sparsity
        layers = state.profile.layers
        z = self.importance(state.profile)
        raw = {l.name: target - self.spread * (max(-self.z_clip, min(self.z_clip, z[l.name])) + adj.get(l.name, 0.0))
               for l in layers}
        total = sum(l.params for l in layers)

        def alloc(shift: float) -> dict[str, float]:
            return {n: min(cap, max(0.0, v + shift)) for n, v in raw.items()}

        def mean(a: dict[str, float]) -> float:
            return sum(a[l.name] * l.params for l in layers) / total

        lo, hi = -1.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if mean(alloc(mid)) < target:
                lo = mid
            else:
                hi = mid
        return alloc(hi)

    # -- proposal ---------------------------------------------------------------------------------
    def propose(self, state: AgentState) -> PruneProposal:
        t0 = time.perf_counter()
        adj = self.penalties(state.history)
        want = self.desired(state, adj)
        eligible = _eligible(state)
        cur = state.layer_sparsities
        recent_bad: set[str] = set()
        for r in state.history[-self.cooldown:] if self.cooldown else []:
            if r.rolled_back:
                recent_bad.update(r.applied)
        step = self.step * (0.5 ** state.consecutive_rollbacks())
        step = max(self.min_step, min(step, 2 * state.remaining if state.remaining > 0 else step))
        k = max(1, math.ceil(self.layers_fraction * len(state.profile.layers)))
        gaps = sorted(((want[n] - cur.get(n, 0.0), n) for n in eligible), key=lambda t: (-t[0], t[1]))
        picks = [(g, n) for g, n in gaps if g > 1e-3 and n not in recent_bad][:k]
        notes = []
        if not picks:  # allocation met (rounding) or everything cooling down: least important eligible layers
            imp = self.importance(state.profile)
            z = {n: v + adj.get(n, 0.0) for n, v in imp.items()}
            order = sorted(eligible, key=lambda n: (n in recent_bad, z[n], n))
            picks = [(step, n) for n in order[:k]]
            notes.append("desired allocation met: least important eligible layers")
        items = [LayerIncrease(layer=n, increase=round(min(max(g, self.min_step), step), 4)) for g, n in picks]
        why = (f"step {step:.3f}: layers furthest below their desired sparsity (target {state.config.target_sparsity:.2f}"
               f" - {self.spread} x combined z, reflection penalties {len([v for v in adj.values() if v])})")
        if recent_bad:
            why += f"; cooling down after rollback: {sorted(recent_bad)}"
        return PruneProposal(decision=PruneDecision(layers=items, rationale=why), strategist=self.name, notes=notes,
                             seconds=time.perf_counter() - t0)


class LLMPruneStrategist(PruneStrategist):
    """LLM prune agent over the OpenAI chat-completions protocol; talks to the endpoint through an
    :class:`~agents.llm_client.LLMClient` (``self.llm``: client, startup check, redaction, retries)."""

    name = "llm"

    def __init__(self, config: LLMConfig | None = None, *, fallback: bool | None = None,
                 fallback_strategist: PruneStrategist | None = None, **config_overrides: Any):
        self.llm = LLMClient(config, fallback=fallback, **config_overrides)
        self.fallback_strategist = fallback_strategist or HeuristicPruneStrategist()
        self.unavailable_reason: str | None = None

    @property
    def config(self) -> LLMConfig:
        return self.llm.config

    def check(self) -> None:
        """Endpoint check at startup (see :meth:`LLMClient.check`); with ``fallback`` a failure only warns."""
        self.unavailable_reason = self.llm.check(stacklevel=2)

    def _prune_fallback(self, state: AgentState, reason: str, raw: list[str], notes: list[str], attempts: int,
                        t0: float) -> PruneProposal:
        self.llm.allow_fallback(f"iteration {state.iteration}: {reason}")
        log.warning("iteration %d: LLM prune agent falls back to heuristic: %s", state.iteration, reason)
        prop = self.fallback_strategist.propose(state)
        return prop.model_copy(update={
            "fallback_reason": reason, "raw_reply": self.llm.redacted_raw(raw),
            "notes": notes + prop.notes, "attempts": attempts, "seconds": time.perf_counter() - t0})

    @staticmethod
    def context_errors(decision: PruneDecision, state: AgentState) -> list[str]:
        known = set(state.profile.names)
        errs = []
        unknown = [x.layer for x in decision.layers if x.layer not in known]
        if unknown:
            errs.append(f"unknown layer names {unknown[:8]}; valid names look like {state.profile.names[:3]}")
        eligible = set(_eligible(state))
        full = [x.layer for x in decision.layers if x.layer in known and x.layer not in eligible]
        if full and len(full) == len(decision.layers):
            errs.append(f"every chosen layer is already at its maximum sparsity: {full[:8]}")
        return errs

    def propose(self, state: AgentState) -> PruneProposal:
        t0 = time.perf_counter()
        if self.unavailable_reason:
            return self._prune_fallback(state, f"LLM unavailable at startup: {self.unavailable_reason}", [], [], 0, t0)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": prune_system_prompt(state)},
            {"role": "user", "content": prune_user_prompt(state, min(self.config.history_rows, state.config.history_rows))},
        ]
        reply = self.llm.ask(messages, PruneDecision, reask=prune_reask_prompt,
                             errors=lambda decision: self.context_errors(decision, state))
        if reply.failure is not None:
            return self._prune_fallback(state, reply.failure, reply.raw, reply.notes, reply.attempts, t0)
        return PruneProposal(decision=reply.value, strategist=self.name, raw_reply=reply.raw_reply,
                             notes=reply.notes, attempts=reply.attempts, seconds=time.perf_counter() - t0)


def create_prune_strategist(name: str = "heuristic", *, llm_config: LLMConfig | None = None,
                            fallback: bool | None = None, **kwargs: Any) -> PruneStrategist:
    if name == "heuristic":
        return HeuristicPruneStrategist(**kwargs)
    if name == "llm":
        return LLMPruneStrategist(llm_config, fallback=fallback, **kwargs)
    raise UserError(f"unknown prune strategist '{name}'; choose from ['heuristic', 'llm']")


# ------------------------------------------------------------------------------------------------
# Loop
# ------------------------------------------------------------------------------------------------
class PruneAgentLoop:
    """The iteration loop, step by step (``done`` / ``propose`` / ``execute``) so a flow can wrap steps."""

    def __init__(self, session: PruneSession, strategist: PruneStrategist, config: LLMPruneConfig, *,
                 history: Sequence[IterationRecord] = (), baseline_ppl: float | None = None,
                 evaluate: Callable[[], float] | None = None):
        self.session, self.strategist, self.config = session, strategist, config
        self.history: list[IterationRecord] = list(history)
        self.resumed = len(self.history)
        self.evaluate = evaluate or session.val_ppl
        self.nm = parse_nm(config.nm)
        self.profile = session.profile  # computes statistics on the current (normally dense) model
        self.baseline_ppl = baseline_ppl if baseline_ppl is not None else (
            self.history[0].ppl_before if self.history else self.evaluate())
        accepted = [r for r in self.history if r.accepted and r.ppl_after is not None]
        self.current_ppl = accepted[-1].ppl_after if accepted else self.baseline_ppl
        self.stalls = 0
        self.stop_reason: str | None = None

    # -- state ----------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return len(self.history)

    @property
    def mm(self):
        return self.session.mm

    def reached(self) -> bool:
        return self.mm.overall_sparsity() >= self.config.target_sparsity - self.config.tolerance

    def done(self) -> bool:
        if self.reached():
            self.stop_reason = "target-reached"
        elif self.iteration >= self.config.max_iterations:
            self.stop_reason = "max-iterations"
        elif self.stalls >= 5:
            self.stop_reason = "stalled"
        else:
            return False
        return True

    def state(self) -> AgentState:
        return AgentState(iteration=self.iteration, config=self.config, profile=self.profile,
                          layer_sparsities={n: round(s, 6) for n, s in self.mm.sparsities().items()},
                          overall_sparsity=self.mm.overall_sparsity(), baseline_ppl=self.baseline_ppl,
                          current_ppl=self.current_ppl, history=list(self.history))

    def propose(self) -> PruneProposal:
        return self.strategist.propose(self.state())

    # -- applying a decision ----------------------------------------------------------------------
    def plan(self, decision: PruneDecision) -> tuple[dict[str, float], dict[str, Any], list[str]]:
        """Clamp the decision to the rules, scale it so the step does not overshoot the target, and pick
        the weights: ``(layer -> new sparsity, layer -> flat indices, notes)``."""
        mm, cfg, notes = self.mm, self.config, []
        cap = cfg.max_layer_sparsity
        wanted: dict[str, float] = {}
        for item in decision.layers:
            if item.layer not in mm.layers:
                notes.append(f"ignored unknown layer {item.layer}")
                continue
            cur = mm.layer_sparsity(item.layer)
            if self.nm is not None:
                level = self.nm[0] / self.nm[1]
                if cur < level - 1e-9:
                    wanted[item.layer] = level
                continue
            new = min(cap, cur + item.increase)
            if new > cur + 1e-9:
                wanted[item.layer] = new
            else:
                notes.append(f"{item.layer} already at the cap {cap}")
        if self.nm is None and wanted:
            remaining = (cfg.target_sparsity - mm.overall_sparsity()) * mm.total_params
            asked = sum((s - mm.layer_sparsity(n)) * mm.layers[n].params for n, s in wanted.items())
            if asked > remaining > 0:
                f = remaining / asked
                wanted = {n: mm.layer_sparsity(n) + (s - mm.layer_sparsity(n)) * f for n, s in wanted.items()}
                notes.append(f"increases scaled by {f:.3f} to land on the target")
        indices = {}
        for n, s in wanted.items():
            w = mm.layers[n].weight  # [out, in], also for GPT-2's Conv1D
            if self.nm is None:
                cols = w.shape[1]
                k_cur = round(mm.layer_sparsity(n) * cols)
                k = max(k_cur + 1, row_count(s, cols))  # at least one more weight per row: progress
                s = min(1.0, k / cols)
            indices[n] = select_prune_indices(wanda_scores(w, self.session.norms[n]), mm.masks[n], s, nm=self.nm)
            wanted[n] = s
        return wanted, indices, notes

    def execute(self, proposal: PruneProposal) -> tuple[IterationRecord, PruneStep | None]:
        """Apply, evaluate, keep or roll back; returns the record and the kept step (None if rolled back)."""
        t0 = time.perf_counter()
        it = self.iteration
        before = self.mm.overall_sparsity()
        applied, indices, notes = self.plan(proposal.decision)
        common = dict(iteration=it, strategist=proposal.strategist, requested=proposal.decision.layers,
                      rationale=proposal.decision.rationale, fallback_reason=proposal.fallback_reason,
                      raw_reply=proposal.raw_reply, notes=proposal.notes + notes, sparsity_before=before,
                      ppl_before=self.current_ppl, propose_seconds=proposal.seconds,
                      device=str(next(self.mm.model.parameters()).device))
        if not indices or sum(int(i.numel()) for i in indices.values()) == 0:
            self.stalls += 1
            rec = IterationRecord(**common, applied={}, sparsity_after=before, accepted=False,
                                  reason="no-op: nothing left to prune in the chosen layers", sparsity=before,
                                  layer_sparsities=self.mm.sparsities(), seconds=time.perf_counter() - t0)
            self.history.append(rec)
            return rec, None
        step = self.mm.prune(indices, iteration=it)
        after = self.mm.overall_sparsity()
        te = time.perf_counter()
        ppl = self.evaluate()
        eval_s = time.perf_counter() - te
        deg = ppl / self.current_ppl - 1 if math.isfinite(ppl) else float("inf")
        ok = math.isfinite(ppl) and deg <= self.config.rollback_threshold
        if ok:
            reason = f"accepted: ppl {deg:+.1%} <= {self.config.rollback_threshold:.0%} threshold"
            self.current_ppl = ppl
            self.stalls = 0
            kept: PruneStep | None = step
        else:
            self.mm.rollback(step)
            most = sorted(applied, key=lambda n: (-applied[n], n))[:4]  # the sparsest layers of the step
            reason = (f"rolled back: ppl {deg:+.1%} > {self.config.rollback_threshold:.0%} threshold "
                      f"(step on {len(applied)} layers, sparsest after it: {', '.join(most)})")
            kept = None
        rec = IterationRecord(**common, applied={n: round(s, 6) for n, s in applied.items()}, sparsity_after=after,
                              removed=step.count, ppl_after=ppl if math.isfinite(ppl) else None,
                              degradation=deg if math.isfinite(deg) else None, accepted=ok, rolled_back=not ok,
                              reason=reason, sparsity=self.mm.overall_sparsity(),
                              layer_sparsities={n: round(s, 6) for n, s in self.mm.sparsities().items()},
                              eval_seconds=eval_s, seconds=time.perf_counter() - t0 + proposal.seconds)
        self.history.append(rec)
        return rec, kept

    def result(self, seconds: float) -> AgentResult:
        return AgentResult(
            stop_reason=self.stop_reason or ("target-reached" if self.reached() else "stopped"),
            iterations=len(self.history), new_iterations=len(self.history) - self.resumed,
            resumed_iterations=self.resumed, rollbacks=sum(r.rolled_back for r in self.history),
            fallbacks=sum(r.fallback_reason is not None for r in self.history), baseline_ppl=self.baseline_ppl,
            final_ppl=self.current_ppl, final_sparsity=self.mm.overall_sparsity(),
            target_sparsity=self.config.target_sparsity, reached=self.reached(),
            layer_sparsities=self.mm.sparsities(), history=list(self.history), seconds=seconds)


def run_prune_agent(session: PruneSession, strategist: PruneStrategist | str = "heuristic",
                    config: LLMPruneConfig | None = None, *, history: Sequence[IterationRecord] = (),
                    baseline_ppl: float | None = None,
                    on_record: Callable[[IterationRecord, PruneStep | None], Any] | None = None,
                    propose: Callable[[PruneAgentLoop], PruneProposal] | None = None,
                    evaluate: Callable[[], float] | None = None) -> AgentResult:
    """Run the loop to the target. ``history`` (already applied to ``session``) resumes a run;
    ``on_record(record, kept_step)`` is called after every iteration (persist it there)."""
    config = config or LLMPruneConfig()
    if isinstance(strategist, str):
        strategist = create_prune_strategist(strategist)
    t0 = time.perf_counter()
    loop = PruneAgentLoop(session, strategist, config, history=history, baseline_ppl=baseline_ppl, evaluate=evaluate)
    while not loop.done():
        prop = propose(loop) if propose is not None else loop.propose()
        rec, kept = loop.execute(prop)
        log.info("iteration %d [%s]: %s; sparsity %.4f, ppl %.3f", rec.iteration, rec.strategist, rec.reason,
                 rec.sparsity, loop.current_ppl)
        if on_record is not None:
            on_record(rec, kept)
    return loop.result(time.perf_counter() - t0)

