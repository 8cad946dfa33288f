"""The LLM-pruning agent's data: decisions, loop settings, iteration records, the state a strategist sees."""
from __future__ import annotations

import json
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pruning.llm.stats import SensitivityProfile
from pruning.llm.wanda import parse_nm

__all__ = ["LayerIncrease", "PruneDecision", "LLMPruneConfig", "IterationRecord", "AgentState", "PruneProposal",
           "AgentResult", "history_jsonl", "read_history_jsonl"]


class LayerIncrease(BaseModel):
    """Raise one layer's sparsity by ``increase`` (absolute: 0.05 = five more percent of its weights)."""

    model_config = ConfigDict(extra="ignore")

    layer: str = Field(description="layer name from the profile, e.g. '0.q_proj'")
    increase: float = Field(gt=0.0, le=0.5, description="added sparsity of this layer, in (0, 0.5]")

    @field_validator("increase", mode="before")
    @classmethod
    def _number(cls, v):
        if isinstance(v, str):
            s = v.strip().rstrip("%")
            try:
                x = float(s)
            except ValueError:
                return v
            return x / 100 if v.strip().endswith("%") else x
        return v


class PruneDecision(BaseModel):
    """A strategist's answer for one iteration."""

    model_config = ConfigDict(extra="ignore")

    layers: list[LayerIncrease] = Field(min_length=1, max_length=256)
    rationale: str = ""

    @field_validator("layers")
    @classmethod
    def _unique(cls, v: list[LayerIncrease]) -> list[LayerIncrease]:
        names = [x.layer for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each layer at most once, duplicated: {dup}")
        return v


class LLMPruneConfig(BaseModel):
    """Loop settings (validated)."""

    target_sparsity: float = Field(0.45, gt=0.0, lt=0.95, description="overall sparsity of the prunable linears")
    rollback_threshold: float = Field(0.10, gt=0.0, description="max relative validation-perplexity rise per step")
    max_iterations: int = Field(80, ge=1)
    max_layer_sparsity: float = Field(0.9, gt=0.0, le=0.99)
    tolerance: float = Field(5e-4, ge=0.0, description="target reached when overall >= target - tolerance")
    nm: str | None = Field(None, description="N:M pattern, e.g. '2:4': a pruned layer becomes exactly N:M")
    history_rows: int = Field(30, ge=1, description="past iterations shown to the LLM")

    @field_validator("nm")
    @classmethod
    def _nm(cls, v):
        parse_nm(v)
        return v

    def model_post_init(self, _ctx) -> None:
        nm = parse_nm(self.nm)
        if nm is not None and self.target_sparsity > nm[0] / nm[1] + 1e-9:
            raise ValueError(f"target sparsity {self.target_sparsity} exceeds what {self.nm} allows ({nm[0] / nm[1]:g})")
        if self.target_sparsity > self.max_layer_sparsity:
            raise ValueError("target_sparsity exceeds max_layer_sparsity")


class IterationRecord(BaseModel):
    """One iteration: the decision, what was applied, perplexity before/after and the verdict."""

    iteration: int
    strategist: str
    requested: list[LayerIncrease] = Field(default_factory=list)
    applied: dict[str, float] = Field(default_factory=dict, description="layer -> new sparsity tried")
    rationale: str = ""
    fallback_reason: str | None = None
    raw_reply: str | None = None
    notes: list[str] = Field(default_factory=list)
    sparsity_before: float
    sparsity_after: float = Field(description="overall sparsity after the step (before any rollback)")
    removed: int = 0
    ppl_before: float
    ppl_after: float | None = None
    degradation: float | None = Field(None, description="ppl_after / ppl_before - 1")
    accepted: bool
    rolled_back: bool = False
    reason: str
    sparsity: float = Field(description="overall sparsity at the end of the iteration (after any rollback)")
    layer_sparsities: dict[str, float] = Field(default_factory=dict)
    step_key: str | None = None
    propose_seconds: float = 0.0
    eval_seconds: float = 0.0
    seconds: float = 0.0
    device: str | None = Field(None, description="where the step was applied and evaluated ('cpu', 'cuda:0')")

    @property
    def layers(self) -> list[str]:
        return list(self.applied)


class AgentState(BaseModel):
    """What a strategist sees (it must not mutate it)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    iteration: int
    config: LLMPruneConfig
    profile: SensitivityProfile
    layer_sparsities: dict[str, float]
    overall_sparsity: float
    baseline_ppl: float
    current_ppl: float
    history: list[IterationRecord] = Field(default_factory=list)

    @property
    def remaining(self) -> float:
        return max(0.0, self.config.target_sparsity - self.overall_sparsity)

    @property
    def total_params(self) -> int:
        return sum(l.params for l in self.profile.layers)

    def consecutive_rollbacks(self) -> int:
        n = 0
        for r in reversed(self.history):
            if r.accepted:
                break
            n += 1
        return n


class PruneProposal(BaseModel):
    decision: PruneDecision
    strategist: str
    raw_reply: str | None = None
    fallback_reason: str | None = None
    notes: list[str] = Field(default_factory=list)
    attempts: int = 0
    seconds: float = 0.0



class AgentResult(BaseModel):
    stop_reason: str
    iterations: int
    new_iterations: int
    resumed_iterations: int
    rollbacks: int
    fallbacks: int
    baseline_ppl: float
    final_ppl: float
    final_sparsity: float
    target_sparsity: float
    reached: bool
    layer_sparsities: dict[str, float]
    history: list[IterationRecord]
    seconds: float



def history_jsonl(records: Sequence[IterationRecord]) -> str:
    return "".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in records)


def read_history_jsonl(text: str) -> list[IterationRecord]:
    return [IterationRecord.model_validate_json(line) for line in text.splitlines() if line.strip()]
