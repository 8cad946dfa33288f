"""The agents' decisions as Prefect tasks, so each one is a visible, retryable step in the UI."""
from __future__ import annotations

from typing import Sequence

from agents.history import RevisionRecord
from agents.master import MasterAgent
from agents.safety import SafetyValidator
from agents.search import RevisionStep, SearchContext, propose_revision
from agents.strategists import HeuristicStrategist, Strategist
from tasks.retry import io_task


@io_task(name="strategy-generation", task_run_name="propose-r{revision}")
def propose(revision: int, history: Sequence[RevisionRecord], context: SearchContext, strategist: Strategist,
            validator: SafetyValidator, master: MasterAgent, heuristic: HeuristicStrategist) -> RevisionStep:
    """Master Agent (guidance, danger zones, stop) -> Analysis Agent (K shapes; LLM replies are parsed and
    validated, never executed) -> Safety validator (clamp or reject with recorded reasons). Retried only
    on transient LLM / network errors."""
    return propose_revision(revision, history, context, strategist, validator, master, heuristic=heuristic)
