"""Pydantic models for every agent output (the JSON of the paper's prompts, Appendix A.2).

The Analysis Agent (LLM or heuristic) answers with a :class:`CNNStrategy` or a :class:`ViTStrategy`;
both turn into a :class:`~pruning.plan.PruningPlan` with :meth:`to_plan`. The Master Agent's answer is
a :class:`MasterGuidance`. Unknown keys in a reply are ignored (the raw reply is kept by the caller).

Design note: in this project the strategist chooses the *shape* of the allocation (multipliers,
criterion, rounding, allocation mode) and the deterministic MAC solver picks the exact base ratio,
so ``channel_pruning_ratio`` is only a starting point and ``expected_achieved_mac`` is informative.
"""
from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from pruning.plan import PruningPlan, default_kind_multiplier

StrategyCriterion = Literal["taylor", "l1norm", "l2norm", "random"]

#: accepted spellings -> canonical criterion of the paper's JSON
CRITERION_ALIASES: dict[str, str] = {
    "taylor": "taylor", "taylor_importance": "taylor", "grouptaylor": "taylor",
    "l1": "l1norm", "l1norm": "l1norm", "l1_norm": "l1norm", "l1-norm": "l1norm",
    "l2": "l2norm", "l2norm": "l2norm", "l2_norm": "l2norm", "l2-norm": "l2norm",
    "magnitude": "l2norm", "norm": "l2norm", "groupnorm": "l2norm",
    "random": "random",
}
#: canonical criterion -> the engine's :data:`pruning.plan.Criterion`
CRITERION_TO_PLAN: dict[str, str] = {"taylor": "taylor", "l1norm": "l1", "l2norm": "l2", "random": "random"}
PLAN_TO_CRITERION: dict[str, str] = {v: k for k, v in CRITERION_TO_PLAN.items()}

ROUND_TO_CHOICES = (1, 2, 4, 8, 16, 32)
_MAX_MULT = 10.0  # same bound as PruningPlan's multipliers


def _norm_criterion(v: Any) -> Any:
    if isinstance(v, str):
        key = v.strip().lower().replace(" ", "")
        return CRITERION_ALIASES.get(key, v)
    return v


def _norm_round_to(v: Any) -> Any:
    """'8', 8.0 -> 8 (an LLM often quotes numbers)."""
    if isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit():
        v = float(v.strip())
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _check_multipliers(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return v
    bad = {k: x for k, x in v.items() if not (0.0 <= float(x) <= _MAX_MULT)}
    if bad:
        raise ValueError(f"multipliers must lie in [0, {_MAX_MULT:g}], got {bad}")
    return {str(k): float(x) for k, x in v.items()}


class _Strategy(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    importance_criterion: StrategyCriterion = Field(
        "l2norm", description="taylor | l1norm | l2norm | random (aliases l1, l2, magnitude accepted)"
    )
    round_to: Literal[1, 2, 4, 8, 16, 32] = Field(8, description="kept channels are a multiple of this")
    global_pruning: bool = Field(True, description="true: rank channels globally within isomorphic groups; false: uniform")
    stage_multipliers: dict[str, float] | None = Field(
        None, description="per-stage scale of the ratio (stage names from the profile; 0 keeps a stage intact)"
    )
    rationale: str = Field("", description="why this strategy")

    @field_validator("importance_criterion", mode="before")
    @classmethod
    def _criterion_alias(cls, v):
        return _norm_criterion(v)

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to_number(cls, v):
        return _norm_round_to(v)

    @field_validator("stage_multipliers")
    @classmethod
    def _stage_range(cls, v):
        return _check_multipliers(v)

    @field_validator("rationale", mode="before")
    @classmethod
    def _rationale_text(cls, v):
        if v is None:
            return ""
        return v if isinstance(v, str) else json.dumps(v)

    # -- shared helpers ----------------------------------------------------------------------
    def _plan_update(self) -> dict[str, Any]:
        return {
            "importance": CRITERION_TO_PLAN[self.importance_criterion],
            "round_to": int(self.round_to),
            "allocation": "global" if self.global_pruning else "uniform",
        }

    @staticmethod
    def _build(base: PruningPlan, update: dict[str, Any]) -> PruningPlan:
        data = base.model_dump()
        data.update(update)
        return PruningPlan.model_validate(data)  # re-validated, unlike model_copy(update=...)


class CNNStrategy(_Strategy):
    """The CNN Analysis Agent's JSON (Appendix A.2.3) plus our shape fields."""

    family: ClassVar[str] = "cnn"
    channel_pruning_ratio: float = Field(
        0.3, ge=0.0, le=1.0, description="starting base ratio; the MAC solver rescales it to land in band"
    )
    kind_multipliers: dict[Literal["internal", "residual"], float] | None = Field(
        None, description="per-kind scale: internal (inside a block) and residual (shared by a residual stream)"
    )
    expected_achieved_mac: float | None = Field(
        None, validation_alias=AliasChoices("expected_achieved_mac", "expected_achieved_macs"),
        description="the strategist's own MAC estimate (informative)",
    )

    @field_validator("kind_multipliers")
    @classmethod
    def _kind_range(cls, v):
        return _check_multipliers(v)

    def to_plan(self, base: PruningPlan) -> PruningPlan:
        update = self._plan_update()
        update["channel_ratio"] = min(max(self.channel_pruning_ratio, 0.0), 0.95)
        if self.stage_multipliers is not None:
            update["stage_multipliers"] = dict(self.stage_multipliers)
        if self.kind_multipliers is not None:
            kinds = {k: v for k, v in base.kind_multipliers.items() if k not in ("internal", "residual")}
            kinds.update(self.kind_multipliers)
            update["kind_multipliers"] = kinds
        return self._build(base, update)


class IsomorphicGroupRatios(BaseModel):
    """Group-wise multipliers of Eq. 3: ``s_ViT = {m_mlp, m_qkv, m_proj, m_head}``."""

    model_config = ConfigDict(extra="ignore")

    mlp_multiplier: float = Field(1.0, ge=0.0, le=_MAX_MULT, description="scale of the ratio for MLP hidden units")
    qkv_multiplier: float = Field(0.5, ge=0.0, le=_MAX_MULT, description="scale of the ratio for attention head dims")
    proj_multiplier: float = Field(0.0, ge=0.0, le=_MAX_MULT, description="embedding width; must stay 0")
    head_multiplier: float = Field(0.0, ge=0.0, le=_MAX_MULT, description="whole attention heads; must stay 0")


class ViTStrategy(_Strategy):
    """The ViT Analysis Agent's JSON (Appendix A.2.4)."""

    family: ClassVar[str] = "vit"
    isomorphic_group_ratios: IsomorphicGroupRatios
    channel_pruning_ratio: float | None = Field(None, ge=0.0, le=1.0, description="optional starting base ratio")

    def to_plan(self, base: PruningPlan) -> PruningPlan:
        g = self.isomorphic_group_ratios
        update = self._plan_update()
        if self.channel_pruning_ratio is not None:
            update["channel_ratio"] = min(max(self.channel_pruning_ratio, 0.0), 0.95)
        kinds = {k: v for k, v in base.kind_multipliers.items() if k not in ("mlp", "qkv", "proj", "head")}
        kinds.update(mlp=g.mlp_multiplier, qkv=g.qkv_multiplier, proj=g.proj_multiplier, head=g.head_multiplier)
        update["kind_multipliers"] = kinds
        if self.stage_multipliers is not None:
            update["stage_multipliers"] = dict(self.stage_multipliers)
        return self._build(base, update)


Strategy = Union[CNNStrategy, ViTStrategy]


def strategy_model(family: str) -> type[CNNStrategy] | type[ViTStrategy]:
    """The strategy schema of a model family ('cnn' or 'vit')."""
    if family == "vit":
        return ViTStrategy
    if family == "cnn":
        return CNNStrategy
    raise ValueError(f"unknown model family '{family}'")


def strategy_from_plan(plan: PruningPlan, family: str, rationale: str = "") -> Strategy:
    """The strategy JSON that :meth:`to_plan` turns back into ``plan`` (for heuristic proposals)."""
    common = dict(
        importance_criterion=PLAN_TO_CRITERION[plan.importance],
        round_to=plan.round_to if plan.round_to in ROUND_TO_CHOICES else 8,
        global_pruning=plan.allocation == "global",
        stage_multipliers=dict(plan.stage_multipliers) or None,
        rationale=rationale,
    )
    km = plan.kind_multipliers
    if family == "vit":
        return ViTStrategy(
            **common, channel_pruning_ratio=plan.channel_ratio,
            isomorphic_group_ratios=IsomorphicGroupRatios(
                mlp_multiplier=km.get("mlp", default_kind_multiplier("mlp")),
                qkv_multiplier=km.get("qkv", default_kind_multiplier("qkv")),
                proj_multiplier=km.get("proj", 0.0),  # a ViT strategy keeps the embedding width unless told
                head_multiplier=km.get("head", default_kind_multiplier("head")),
            ),
        )
    kinds = {k: v for k, v in km.items() if k in ("internal", "residual")}
    return CNNStrategy(**common, channel_pruning_ratio=plan.channel_ratio, kind_multipliers=kinds or None)


# ------------------------------------------------------------------------------------------------
# Master Agent
# ------------------------------------------------------------------------------------------------
class DangerZone(BaseModel):
    """A failed configuration and a ±``tolerance`` box around it (Appendix A.3.3, item 3).

    ``coords`` are the plan's multipliers, keyed ``stage:<name>`` / ``kind:<name>``, each family
    normalised by its maximum (the solver makes the overall scale irrelevant). A plan is inside the
    zone when criterion and round_to match and every shared coordinate is within ``tolerance``.
    """

    model_config = ConfigDict(extra="ignore")

    revision: int | None = None
    reason: str = ""
    importance: str | None = None
    round_to: int | None = None
    allocation: str | None = None
    coords: dict[str, float] = Field(default_factory=dict)
    blame: str | None = Field(None, description="coordinate judged responsible (most aggressive); moved first")
    tolerance: float = 0.05

    def contains(self, coords: dict[str, float], importance: str, round_to: int, allocation: str | None = None) -> bool:
        if self.importance is not None and importance != self.importance:
            return False
        if self.round_to is not None and round_to != self.round_to:
            return False
        if self.allocation is not None and allocation is not None and allocation != self.allocation:
            return False
        shared = set(self.coords) & set(coords)
        if not shared:
            return False
        return all(abs(coords[k] - self.coords[k]) <= self.tolerance + 1e-9 for k in shared)


Action = Literal["explore", "refine", "conservative_fallback", "diversify", "stop"]


class MasterGuidance(BaseModel):
    """The Master Agent's JSON (Appendix A.2.2) plus structured fields for the strategist."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    multiplier_tuning_order: list[str] = Field(default_factory=list)
    target_macs: float | None = None
    global_pruning: bool | None = True
    rationale: str = ""
    continue_search: bool = Field(
        True, validation_alias=AliasChoices("continue", "continue_search"), serialization_alias="continue"
    )
    stop_reason: str | None = None
    # -- structured additions ----------------------------------------------------------------
    phase: Literal["find_valid", "explore", "done"] = "find_valid"
    danger_zones: list[DangerZone] = Field(default_factory=list)
    collapse_detected: bool = False
    stagnating: bool = False
    recommended_action: Action = "explore"
    delta_r: float | None = Field(None, description="MAC error reduction rate |e_r|-|e_{r-1}| in % of target (<0: better)")
    best_revision: int | None = None
    first_valid_revision: int | None = None
    remaining_extra: int | None = Field(None, description="phase-2 revisions left after the first valid one")
    mac_error_groups: dict[str, list[int]] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Parsing helpers (LLM replies)
# ------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: the whole reply, a ```json fence, or an object inside prose.

    Raises ``ValueError`` when there is none. Nothing in the text is ever executed.
    """
    if text is None:
        raise ValueError("empty reply")
    s = text.strip()
    if not s:
        raise ValueError("empty reply")
    candidates: list[str] = [s] + [m.group(1).strip() for m in _FENCE.finditer(s)]
    for c in candidates:
        try:
            obj = json.loads(c)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    for i, ch in enumerate(s):
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(s, i)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("no JSON object found in the reply")


def format_validation_error(exc: ValidationError, limit: int = 8) -> str:
    """Compact, LLM-readable list of what is wrong: ``field: message (got value)``."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(root)"
        got = err.get("input")
        got_s = json.dumps(got, default=str) if not isinstance(got, dict) else "{...}"
        if len(got_s) > 60:
            got_s = got_s[:57] + "..."
        parts.append(f"{loc}: {err.get('msg', 'invalid')} (got {got_s})")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)
