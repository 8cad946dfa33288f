"""The Analysis Agent: strategists that propose allocation shapes (heuristic, LLM), behind a registry."""
from agents.strategists.strategists import (  # noqa: F401
    AnyStrategy,
    HeuristicStrategist,
    LLMConfig,
    LLMStrategist,
    LLMUnavailable,
    Proposal,
    StrategiesExhausted,
    Strategist,
    StrategyContext,
    create_strategist,
    list_strategists,
    register_strategist,
)
