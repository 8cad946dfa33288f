"""The agents' decisions as Prefect tasks, so each one is a visible, retryable step in the UI."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from agents.safety import SafetyValidator
from agents.strategists import Proposal, Strategist, StrategyContext
from tasks.retry import IO_RETRY_DELAYS, retry_on_transient


@task(name="strategy-generation", retries=2, retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=retry_on_transient, cache_policy=NONE)
def propose(strategist: Strategist, context: StrategyContext) -> Proposal:
    """Analysis Agent: the next allocation shape (LLM replies are parsed and validated, never executed)."""
    return strategist.propose(context)


@task(name="safety-validation", cache_policy=NONE)
def validate(validator: SafetyValidator, proposal, profile, history, **kwargs):
    """Safety validator: clamp or reject with recorded reasons; an unsafe plan never reaches the pruner."""
    return validator.validate(proposal, profile, history, **kwargs)


class TaskStrategist(Strategist):
    """Delegates ``propose`` to the ``strategy-generation`` task."""

    def __init__(self, inner: Strategist):
        self.inner = inner
        self.name = inner.name

    def check(self) -> None:
        self.inner.check()

    def propose(self, context: StrategyContext) -> Proposal:
        return propose(self.inner, context)


class TaskValidator:
    """A SafetyValidator whose ``validate`` runs as the ``safety-validation`` task."""

    def __init__(self, inner: SafetyValidator):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def validate(self, proposal, profile, history=(), **kwargs):
        return validate(self.inner, proposal, profile, list(history), **kwargs)
