"""Prefect tasks of the LLM pruning flow: thin wrappers over :mod:`agents.llm_pipeline` and the agent loop."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from agents.llm_pruning import IterationRecord, PruneAgentLoop, PruneProposal
from pruning.llm.masks import PruneStep
from tasks import llm_steps
from tasks.config import LLMRunConfig
from tasks.retry import IO_RETRY_DELAYS, io_task, retry_on_transient


@io_task(name="llm-open-run")
def open_run(config: LLMRunConfig) -> llm_steps.LLMRunInfo:
    """Check the store, then create the run or find it for resuming."""
    return llm_steps.open_run(config)


@io_task(name="llm-prepare-model")
def prepare(config: LLMRunConfig, run_id: str) -> llm_steps.ModelInfo:
    """Load (or train, for the embedded default) the model, profile it, replay persisted steps."""
    return llm_steps.prepare(config, run_id)


@task(name="llm-agent-decision", retries=2, retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=retry_on_transient, cache_policy=NONE)
def propose(loop: PruneAgentLoop) -> PruneProposal:
    """The agent chooses layers and increases (LLM replies are parsed and validated, never executed)."""
    return loop.propose()


@task(name="llm-prune-evaluate", cache_policy=NONE)
def execute(loop: PruneAgentLoop, proposal: PruneProposal) -> tuple[IterationRecord, PruneStep | None]:
    """Apply the step, measure validation perplexity, keep it or roll it back exactly."""
    return loop.execute(proposal)


@io_task(name="llm-persist-iteration")
def persist(config: LLMRunConfig, run_id: str, record: IterationRecord, step: PruneStep | None) -> IterationRecord:
    """Step file (removed indices + values) first, then the history record (idempotent)."""
    return llm_steps.persist_iteration(config, run_id, record, step)
