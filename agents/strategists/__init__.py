"""The Analysis Agent: strategists that propose allocation shapes (heuristic, LLM), behind a registry.

:mod:`~agents.strategists.base` (context, proposal, registry, interface), :mod:`~agents.strategists.heuristic`
and :mod:`~agents.strategists.llm` (importing them registers ``"heuristic"`` and ``"llm"``).
"""
from agents.llm_client import LLMConfig  # noqa: F401
from agents.strategists.base import (  # noqa: F401
    AnyStrategy,
    LLMUnavailable,
    Proposal,
    StrategiesExhausted,
    Strategist,
    StrategyContext,
    create_strategist,
    list_strategists,
    register_strategist,
)
from agents.strategists.heuristic import HeuristicStrategist  # noqa: F401
from agents.strategists.llm import LLMStrategist  # noqa: F401
