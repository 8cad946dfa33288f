"""The Analysis Agent's interface: context, proposal, exceptions, registry and plan-coordinate helpers.

One interface, :meth:`Strategist.propose` ``(StrategyContext) -> Proposal``, and a registry::

    @register_strategist("mine")
    class MyStrategist(Strategist): ...

    create_strategist("heuristic")                       # deterministic, offline (default)
    create_strategist("llm", config=LLMConfig(...))      # any OpenAI-compatible endpoint
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field

from agents.history import RevisionRecord
from agents.llm_client import LLMUnavailable
from agents.profiling import ProfileSummary
from agents.schemas import CNNStrategy, MasterGuidance, ViTStrategy
from pruning.errors import UserError
from pruning.plan import PruningPlan, default_kind_multiplier
from pruning.solver import MacBand

__all__ = ["AnyStrategy", "StrategyContext", "Proposal", "StrategiesExhausted", "LLMUnavailable",
           "Strategist", "register_strategist", "list_strategists", "create_strategist",
           "coord_value", "with_coord"]

AnyStrategy = Union[CNNStrategy, ViTStrategy]


class StrategyContext(BaseModel):
    """Everything a strategist may use: s_r = LLM(H, M_target, P_profiling, G_master) (Eq. 2)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    revision: int
    profile: ProfileSummary
    band: MacBand
    history: list[RevisionRecord] = Field(default_factory=list)
    guidance: MasterGuidance = Field(default_factory=MasterGuidance)
    base_plan: PruningPlan = Field(default_factory=PruningPlan)
    baseline_accuracy: float | None = None
    seed: int = 0
    candidate: int = Field(0, ge=0, description="index of the proposal within the revision (K candidates)")
    pending: list[PruningPlan] = Field(default_factory=list,
                                       description="plans already proposed for this revision: propose a different shape")

    @property
    def family(self) -> str:
        return self.profile.family


class Proposal(BaseModel):
    """A strategist's answer: the strategy JSON, the plan it maps to, and provenance."""

    strategy: AnyStrategy
    plan: PruningPlan
    strategist: str = Field(description="who produced this proposal")
    raw_reply: str | None = None
    notes: list[str] = Field(default_factory=list)
    fallback_reason: str | None = None
    move: str | None = None
    parent_revision: int | None = None
    attempts: int = 0
    seconds: float = 0.0


class StrategiesExhausted(RuntimeError):
    """The strategist has no new (non-duplicate, safe) plan left to propose."""


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type["Strategist"]] = {}


def register_strategist(name: str) -> Callable[[type["Strategist"]], type["Strategist"]]:
    """Class decorator: make a strategist available to :func:`create_strategist` under ``name``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_strategists() -> list[str]:
    return sorted(_REGISTRY)


def create_strategist(name: str, **kwargs: Any) -> "Strategist":
    if name not in _REGISTRY:
        raise UserError(f"unknown strategist '{name}'; choose from {list_strategists()}")
    return _REGISTRY[name](**kwargs)


class Strategist(abc.ABC):
    """Proposes the next strategy from the context; must not mutate the context."""

    name: ClassVar[str] = "base"

    def check(self) -> None:
        """Startup check (e.g. endpoint reachable); raise with a clear message if unusable."""
        return None

    @abc.abstractmethod
    def propose(self, context: StrategyContext) -> Proposal: ...


# ------------------------------------------------------------------------------------------------
# Plan coordinates: 'stage:<name>' / 'kind:<name>' multipliers (raw, not normalised)
# ------------------------------------------------------------------------------------------------
def coord_value(plan: PruningPlan, key: str) -> float:
    """The multiplier behind ``key`` (``'stage:layer1'``, ``'kind:qkv'``), with the plan's defaults."""
    fam, name = key.split(":", 1)
    if fam == "stage":
        return plan.stage_multipliers.get(name, 1.0)
    return plan.kind_multipliers.get(name, default_kind_multiplier(name))


def with_coord(plan: PruningPlan, key: str, value: float) -> PruningPlan:
    """``plan`` with the multiplier behind ``key`` set to ``value`` (rounded to 4 decimals)."""
    fam, name = key.split(":", 1)
    field = "stage_multipliers" if fam == "stage" else "kind_multipliers"
    upd = dict(getattr(plan, field))
    upd[name] = round(value, 4)
    return plan.model_copy(update={field: upd})
