"""The LLM-pruning agent (seed 003): layer-wise sparsity decisions with self-reflection and rollback.

:mod:`~agents.llm_pruning.schemas` (decisions, settings, records, state), :mod:`~agents.llm_pruning.prompts`
and :mod:`~agents.llm_pruning.agent` (strategists and the loop).
"""
from agents.llm_pruning.agent import (  # noqa: F401
    HeuristicPruneStrategist,
    LLMPruneStrategist,
    PruneAgentLoop,
    PruneStrategist,
    create_prune_strategist,
    run_prune_agent,
)
from agents.llm_pruning.prompts import (  # noqa: F401
    PRUNE_SYSTEM,
    prune_reask_prompt,
    prune_system_prompt,
    prune_user_prompt,
)
from agents.llm_pruning.schemas import (  # noqa: F401
    AgentResult,
    AgentState,
    IterationRecord,
    LayerIncrease,
    LLMPruneConfig,
    PruneDecision,
    PruneProposal,
    history_jsonl,
    read_history_jsonl,
)
