"""The LLM Analysis Agent over the OpenAI chat-completions protocol.

The strategist never executes anything it receives: replies are parsed as JSON and validated with
pydantic; on invalid output the validation error is sent back (up to ``max_retries`` times), then the
heuristic strategist answers for that revision and the reason is recorded.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from agents.limits import SafetyLimits
from agents.llm_client import LLMClient, LLMConfig
from agents.prompts import reask_prompt, system_prompt, user_prompt
from agents.schemas import strategy_model
from agents.strategists.base import AnyStrategy, Proposal, Strategist, StrategyContext, register_strategist
from agents.strategists.heuristic import HeuristicStrategist

__all__ = ["LLMStrategist"]

log = logging.getLogger(__name__)


@register_strategist("llm")
class LLMStrategist(Strategist):
    """LLM Analysis Agent; talks to the endpoint through an :class:`~agents.llm_client.LLMClient` (``self.llm``)."""

    def __init__(self, config: LLMConfig | None = None, *, fallback: bool | None = None,
                 fallback_strategist: Strategist | None = None, limits: SafetyLimits | None = None,
                 dataset: str | None = None, **config_overrides: Any):
        self.llm = LLMClient(config, fallback=fallback, **config_overrides)
        self.limits = limits or SafetyLimits.for_dataset(dataset)
        self.fallback_strategist = fallback_strategist or HeuristicStrategist(limits=self.limits)
        self.unavailable_reason: str | None = None

    @property
    def config(self) -> LLMConfig:
        return self.llm.config

    def check(self) -> None:
        """GET /models (or a 1-token chat call if /models is missing). Raises :class:`LLMUnavailable`.

        With ``fallback=True`` a failure only warns; every revision then uses the heuristic
        strategist and records why.
        """
        self.unavailable_reason = self.llm.check(stacklevel=2)

    # -- proposal ------------------------------------------------------------------------------
    def _fallback(self, ctx: StrategyContext, reason: str, raw: list[str], notes: list[str], attempts: int,
                  t0: float) -> Proposal:
        self.llm.allow_fallback(f"revision {ctx.revision}: {reason}")
        log.warning("revision %d: LLM strategist falls back to heuristic: %s", ctx.revision, reason)
        prop = self.fallback_strategist.propose(ctx)
        return prop.model_copy(update={
            "fallback_reason": reason,
            "raw_reply": self.llm.redacted_raw(raw),
            "notes": notes + prop.notes, "attempts": attempts, "seconds": time.perf_counter() - t0,
        })

    def _profile_errors(self, strategy: AnyStrategy, ctx: StrategyContext) -> list[str]:
        """Context checks the schema cannot do (unknown stage names)."""
        errs = []
        stages = strategy.stage_multipliers or {}
        unknown = sorted(set(stages) - set(ctx.profile.stages))
        if unknown:
            errs.append(f"stage_multipliers: unknown stage names {unknown}; valid stages are {ctx.profile.stages}")
        return errs

    def propose(self, context: StrategyContext) -> Proposal:
        t0 = time.perf_counter()
        ctx = context
        if self.unavailable_reason:
            return self._fallback(ctx, f"LLM unavailable at startup: {self.unavailable_reason}", [], [], 0, t0)
        schema = strategy_model(ctx.profile.family)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": system_prompt(ctx.profile, ctx.band, self.limits)},
            {"role": "user", "content": user_prompt(ctx.profile, ctx.band, ctx.history, ctx.guidance, ctx.revision,
                                                    ctx.baseline_accuracy, self.config.history_rows, ctx.pending)},
        ]
        reply = self.llm.ask(messages, schema, reask=reask_prompt,
                             errors=lambda strategy: self._profile_errors(strategy, ctx),
                             convert=lambda strategy: (strategy, strategy.to_plan(ctx.base_plan)))
        if reply.failure is not None:
            return self._fallback(ctx, reply.failure, reply.raw, reply.notes, reply.attempts, t0)
        strategy, plan = reply.value
        return Proposal(strategy=strategy, plan=plan, strategist=self.name, raw_reply=reply.raw_reply,
                        notes=reply.notes, attempts=reply.attempts, seconds=time.perf_counter() - t0)
