"""The agents of AgenticPruner: Profiling, Master, Analysis (strategists), safety validation, search loop.

Plain Python (no orchestration imports). Names are imported lazily so ``import agents`` stays cheap::

    from agents import run_search, SearchContext, HeuristicStrategist, SafetyValidator, MasterAgent
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CNNStrategy": "schemas", "ViTStrategy": "schemas", "MasterGuidance": "schemas", "DangerZone": "schemas",
    "ProfileSummary": "profiling", "build_profile": "profiling",
    "Strategist": "strategists", "StrategyContext": "strategists", "Proposal": "strategists",
    "HeuristicStrategist": "strategists", "LLMStrategist": "strategists",
    "StrategiesExhausted": "strategists",
    "register_strategist": "strategists", "create_strategist": "strategists", "list_strategists": "strategists",
    "LLMClient": "llm_client", "LLMConfig": "llm_client", "LLMUnavailable": "llm_client",
    "SafetyLimits": "limits",
    "SafetyValidator": "safety", "Verdict": "safety", "fallback_plan": "safety",
    "compute_danger_zones": "zones",
    "MasterAgent": "master", "MasterConfig": "master", "select_best": "master",
    "RevisionRecord": "history", "to_jsonl": "history", "from_jsonl": "history", "append_jsonl": "history",
    "history_dataframe": "history",
    "run_search": "search", "SearchContext": "search", "SearchResult": "search", "Measured": "search",
    "Evaluated": "search", "Slot": "search", "propose_revision": "search", "prune_candidates": "search",
    "finetune_candidates": "search", "record_revision": "search", "finish_search": "search",
    "RungSchedule": "search", "promoted": "search", "RungResult": "history", "move_effects": "master",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'agents' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
