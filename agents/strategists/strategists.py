"""Analysis Agent (Section 3.2.3): strategists that propose the next pruning strategy.

One interface, :meth:`Strategist.propose` ``(StrategyContext) -> Proposal``, and a registry::

    @register_strategist("mine")
    class MyStrategist(Strategist): ...

    create_strategist("heuristic")                       # deterministic, offline (default)
    create_strategist("llm", config=LLMConfig(...))      # any OpenAI-compatible endpoint

The LLM strategist never executes anything it receives: replies are parsed as JSON and validated
with pydantic; on invalid output the validation error is sent back (up to ``max_retries`` times),
then the heuristic strategist answers for that revision and the reason is recorded.
"""
from __future__ import annotations

import abc
import logging
import random
import time
import warnings
from typing import Any, Callable, ClassVar, Sequence, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.history import RevisionRecord, plan_coords, plan_signature
from agents.llm_client import ask_validated, redacted_raw
from agents.master import per_revision, rank_key
from agents.profiling import ProfileSummary
from agents.prompts import reask_prompt, system_prompt, user_prompt
from agents.safety import SafetyLimits, fallback_plan
from agents.schemas import (
    CNNStrategy,
    MasterGuidance,
    ViTStrategy,
    strategy_from_plan,
    strategy_model,
)
from pruning.errors import UserError
from pruning.plan import PruningPlan
from pruning.solver import MacBand

log = logging.getLogger(__name__)

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


class LLMUnavailable(UserError):
    """The configured LLM endpoint cannot be used (raised by ``check()`` at startup)."""


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
# Heuristic strategist
# ------------------------------------------------------------------------------------------------
def _coord_value(plan: PruningPlan, key: str) -> float:
    fam, name = key.split(":", 1)
    if fam == "stage":
        return plan.stage_multipliers.get(name, 1.0)
    return plan.kind_multipliers.get(name, 0.0 if name == "head" else 1.0)


def _with_coord(plan: PruningPlan, key: str, value: float) -> PruningPlan:
    fam, name = key.split(":", 1)
    field = "stage_multipliers" if fam == "stage" else "kind_multipliers"
    upd = dict(getattr(plan, field))
    upd[name] = round(value, 4)
    return plan.model_copy(update={field: upd})


@register_strategist("heuristic")
class HeuristicStrategist(Strategist):
    """Deterministic, offline strategist.

    * Revision 0: a sensible shape. CNN: internal channels pruned more than residual ones (x0.5),
      first stage protected (x0.5). ViT: MLP pruned more than QKV (x0.5), no heads, no proj.
    * Phase 1 (no in-band result yet): finer rounding, then a uniform shape, then the safe preset.
    * Phase 2: hill-climbing from the best in-band revision with single-coordinate moves; a move that
      lowered accuracy or collapsed is banned, its opposite is tried first (pruning shifts away from
      the sensitive stage/kind); a move that helped is repeated (momentum). Plans already executed or
      inside the Master's danger zones are never proposed; when the move list is exhausted, seeded
      random perturbations are tried, then :class:`StrategiesExhausted` is raised.
    """

    UP, DOWN = 1.5, 0.6
    EPS = 1e-3  # accuracy change treated as noise

    def __init__(self, limits: SafetyLimits | None = None, dataset: str | None = None):
        self.limits = limits or SafetyLimits.for_dataset(dataset)

    # -- shapes --------------------------------------------------------------------------------
    def initial_plan(self, ctx: StrategyContext) -> PruningPlan:
        """Revision 0. The user's criterion and rounding (``base_plan``) are kept when allowed."""
        p, base = ctx.profile, ctx.base_plan
        data = base.model_dump()
        crit = "l2" if base.importance == "taylor" and not p.taylor_available else base.importance
        data.update(importance=crit, allocation="global",
                    max_layer_ratio=min(base.max_layer_ratio, self.limits.max_layer_ratio))
        if p.family == "vit":
            data.update(kind_multipliers={"mlp": 1.0, "qkv": 0.5, "proj": 0.0, "head": 0.0}, stage_multipliers={},
                        round_to=base.round_to if base.round_to in self.limits.vit_round_to else 8,
                        min_head_dim=max(base.min_head_dim, self.limits.min_head_dim))
        else:
            # Protect residual streams and the first stage, unless the budget is so tight that a protective
            # shape cannot reach it (e.g. ConvNeXt-B at 1.12 G = 93 % reduction): then prune uniformly.
            reduction = 1.0 - ctx.band.target_macs / p.base_macs
            protect = 0.5 if reduction < 0.8 else 1.0
            kinds = {"internal": 1.0}
            if "residual" in p.kinds:
                kinds["residual"] = protect
            stages = {p.first_stage: protect} if p.first_stage and len(p.stages) > 1 and protect < 1 else {}
            min_ch = min(p.min_channels_by_kind.values(), default=64)
            limit = max(1, min_ch // 2)
            rt = base.round_to if base.round_to <= limit else max(c for c in (1, 2, 4, 8, 16, 32) if c <= limit)
            data.update(kind_multipliers=kinds, stage_multipliers=stages, round_to=rt)
        return PruningPlan.model_validate(data)

    def _coordinate_moves(self, p: ProfileSummary) -> list[str]:
        """Ordered single-coordinate moves ('key+' prunes that part more, 'key-' less)."""
        first, last, heavy = p.first_stage, p.last_stage, p.heaviest_stage
        moves: list[str] = []
        if p.family == "vit":
            moves += ["kind:qkv-", "kind:qkv+"]
            if first and len(p.stages) > 1:
                moves += [f"stage:{first}-"]
            if last and len(p.stages) > 1:
                moves += [f"stage:{last}-", f"stage:{last}+"]
        else:
            if "residual" in p.kinds:
                moves += ["kind:residual-"]
            if first and len(p.stages) > 1:
                moves += [f"stage:{first}-"]
            if last and len(p.stages) > 1:
                moves += [f"stage:{last}+"]
            if "residual" in p.kinds:
                moves += ["kind:residual+"]
            if heavy and heavy not in (first, last):
                moves += [f"stage:{heavy}-"]
            if last and len(p.stages) > 1:
                moves += [f"stage:{last}-"]
            if first and len(p.stages) > 1:
                moves += [f"stage:{first}+"]
        seen, out = set(), []
        for m in moves:
            if m not in seen:
                seen.add(m)
                out.append(m)
        return out

    def _discrete_moves(self, plan: PruningPlan, p: ProfileSummary) -> list[str]:
        crit_alt = {"l2": "l1", "l1": "l2", "taylor": "l2", "random": "l2"}[plan.importance]
        out = [f"criterion:{crit_alt}"]
        if p.taylor_available and plan.importance != "taylor":
            out.insert(0, "criterion:taylor")
        if p.family == "vit":
            out.append(f"round_to:{16 if plan.round_to != 16 else 8}")
        else:
            out.append(f"round_to:{16 if plan.round_to < 16 else 8}")
        out.append(f"allocation:{'uniform' if plan.allocation == 'global' else 'global'}")
        return out

    def apply_move(self, plan: PruningPlan, move: str, p: ProfileSummary,
                   factor: float | None = None) -> PruningPlan | None:
        """``plan`` changed by ``move``, within the safety caps; None when the move changes nothing."""
        L = self.limits
        if move.startswith(("criterion:", "round_to:", "allocation:")):
            what, val = move.split(":", 1)
            field = {"criterion": "importance", "round_to": "round_to", "allocation": "allocation"}[what]
            new = plan.model_copy(update={field: int(val) if field == "round_to" else val})
            if field == "round_to" and p.family != "vit":
                min_ch = min(p.min_channels_by_kind.values(), default=64)
                if int(val) > max(1, min_ch // 2):
                    return None
            return new if new != plan else None
        key, direction = move[:-1], move[-1]
        cur = _coord_value(plan, key)
        if cur <= 0:
            return None
        val = cur * (factor if factor is not None else (self.UP if direction == "+" else self.DOWN))
        fam, name = key.split(":", 1)
        if fam == "stage":
            cap = L.first_stage_max if name == p.first_stage else L.max_stage_multiplier
        else:
            cap = L.kind_max.get(name, 10.0)
            if name == "qkv":
                cap = min(cap, L.qkv_over_mlp_max * _coord_value(plan, "kind:mlp"))
        val = min(val, cap)
        if abs(val - cur) < 1e-4:
            return None
        new = _with_coord(plan, key, val)
        if fam == "kind" and name == "mlp" and p.family == "vit":  # keep qkv <= ratio x mlp
            q = _coord_value(new, "kind:qkv")
            if q > L.qkv_over_mlp_max * val:
                new = _with_coord(new, "kind:qkv", L.qkv_over_mlp_max * val)
        return new

    @staticmethod
    def _opposite(move: str) -> str | None:
        if move and move[-1] in "+-" and move.startswith(("stage:", "kind:")):
            return move[:-1] + ("-" if move[-1] == "+" else "+")
        return None

    # -- learning from history ----------------------------------------------------------------
    def _effects(self, history: Sequence[RevisionRecord]) -> dict[str, float]:
        """move -> accuracy change vs. its parent (-inf for collapse / failure)."""
        by_rev = {r.revision: r for r in per_revision(history)}  # a parent is its revision's best candidate
        eff: dict[str, float] = {}
        for r in history:
            if not r.move or r.parent_revision is None or r.parent_revision not in by_rev:
                continue
            parent = by_rev[r.parent_revision]
            if not r.is_candidate or (r.collapsed and not parent.collapsed):
                d = float("-inf")
            elif r.accuracy is None or parent.accuracy is None:
                continue
            else:
                d = r.accuracy - parent.accuracy
            eff[r.move] = min(eff.get(r.move, d), d)
        return eff

    # -- proposal ------------------------------------------------------------------------------
    def propose(self, context: StrategyContext) -> Proposal:
        t0 = time.perf_counter()
        p, hist = context.profile, context.history
        seen = {plan_signature(plan, p.stages, p.kinds) for plan in context.pending}
        for r in hist:
            seen.add(plan_signature(r.plan, p.stages, p.kinds))
            if r.signature:
                seen.add(r.signature)
        zones = context.guidance.danger_zones

        def usable(plan: PruningPlan) -> bool:
            if plan_signature(plan, p.stages, p.kinds) in seen:
                return False
            coords = plan_coords(plan, p.stages, p.kinds)
            return not any(z.contains(coords, plan.importance, plan.round_to, plan.allocation) for z in zones)

        choice = self._choose(context, usable)
        if choice is None:
            raise StrategiesExhausted(f"heuristic strategist has no new safe plan left at revision {context.revision}")
        plan, move, parent, why = choice
        strategy = strategy_from_plan(plan, p.family, rationale=why)
        return Proposal(strategy=strategy, plan=plan, strategist=self.name, move=move, parent_revision=parent,
                        notes=[why], seconds=time.perf_counter() - t0)

    def _choose(self, ctx: StrategyContext, usable) -> tuple[PruningPlan, str, int | None, str] | None:
        p, hist = ctx.profile, ctx.history
        initial = self.initial_plan(ctx)
        if not hist and usable(initial):
            return initial, "initial", None, "revision 0: default shape " + self._shape_text(initial)
        cands = [r for r in hist if r.is_candidate]
        healthy = [r for r in cands if not r.collapsed]
        protective: list[str] = []
        if not cands:
            # phase 1: reach the band
            options: list[tuple[PruningPlan, str, str]] = []
            last = hist[-1] if hist else None
            if last is not None and last.status == "ok" and not last.in_band and last.error_pct is not None:
                for rt in (4, 2, 1) if p.family != "vit" else (8,):
                    if rt < last.plan.round_to:
                        options.append((last.plan.model_copy(update={"round_to": rt}), f"round_to:{rt}",
                                        f"revision {last.revision} missed the band by granularity: finer rounding"))
            uniform = initial.model_copy(update={
                "stage_multipliers": {},
                "kind_multipliers": ({"mlp": 1.0, "qkv": round(min(1.0, self.limits.qkv_over_mlp_max), 4),
                                      "proj": 0.0, "head": 0.0} if p.family == "vit" else {}),
            })
            options.append((initial, "initial", "default shape"))
            options.append((uniform, "uniform-shape", "spread pruning over all groups to reach the target"))
            options.append((fallback_plan(p, ctx.band, ctx.base_plan, p.dataset, self.limits), "fallback-preset",
                            "safe fallback preset (A.3.4)"))
            for plan, mv, why in options:
                if usable(plan):
                    return plan, mv, None, why
            parent_rec = None
            parent_plan = initial
        else:
            parent_rec = min(healthy or cands, key=rank_key)
            parent_plan = parent_rec.plan
            if parent_rec.collapsed:  # every candidate collapsed: protect the fragile parts first
                protective = ["kind:qkv-"] if p.family == "vit" else ["kind:residual-"]
                if p.first_stage and len(p.stages) > 1:
                    protective.append(f"stage:{p.first_stage}-")

        effects = self._effects(hist)
        bad = {m for m, d in effects.items() if d < -self.EPS}
        good = [m for m, d in effects.items() if d > self.EPS]
        ordered: list[str] = list(protective)
        # momentum: repeat the move that produced the current best
        if parent_rec is not None and parent_rec.move in good:
            ordered.append(parent_rec.move)
        # shift away from what hurt: the opposite of a harmful move first
        for m, d in sorted(effects.items(), key=lambda kv: (kv[1], kv[0])):
            opp = self._opposite(m)
            if d < -self.EPS and opp:
                ordered.append(opp)
        ordered += self._coordinate_moves(p) + self._discrete_moves(parent_plan, p)
        tried_here = {r.move for r in hist if parent_rec is not None and r.parent_revision == parent_rec.revision}
        parent_rev = parent_rec.revision if parent_rec is not None else None
        for mv in dict.fromkeys(ordered):
            if mv in bad or mv in tried_here and mv not in good:
                continue
            new = self.apply_move(parent_plan, mv, p)
            if new is not None and usable(new):
                why = f"from revision {parent_rev}: {mv}" if parent_rev is not None else f"{mv}"
                if mv in good:
                    why += " (it improved accuracy before)"
                elif self._opposite(mv) in bad:
                    why += f" ({self._opposite(mv)} lowered accuracy)"
                return new, mv, parent_rev, why
        # two-move combinations of non-harmful coordinate moves
        singles = [m for m in self._coordinate_moves(p) if m not in bad]
        for i, a in enumerate(singles):
            for b in singles[i + 1:]:
                if a[:-1] == b[:-1]:
                    continue
                first = self.apply_move(parent_plan, a, p)
                new = self.apply_move(first, b, p) if first is not None else None
                if new is not None and usable(new):
                    return new, f"{a}&{b}", parent_rev, f"from revision {parent_rev}: combined {a} and {b}"
        # seeded random perturbations
        keys = sorted({m[:-1] for m in self._coordinate_moves(p)})
        rng = random.Random(f"{ctx.seed}:{ctx.revision}")
        for _ in range(40):
            if not keys:
                break
            key = rng.choice(keys)
            factor = rng.choice((0.5, 0.7, 1.3, 1.6))
            mv = f"{key}{'+' if factor > 1 else '-'}"
            cur = _coord_value(parent_plan, key)
            if cur <= 0:
                continue
            new = self.apply_move(parent_plan, mv, p, factor=factor)
            if new is not None and usable(new):
                return new, f"random:{key}*{factor}", parent_rev, f"seeded perturbation {key} x{factor}"
        return None

    @staticmethod
    def _shape_text(plan: PruningPlan) -> str:
        return (f"criterion {plan.importance}, round_to {plan.round_to}, kinds {plan.kind_multipliers}, "
                f"stages {plan.stage_multipliers}")


# ------------------------------------------------------------------------------------------------
# LLM strategist
# ------------------------------------------------------------------------------------------------
class LLMConfig(BaseSettings):
    """OpenAI-compatible endpoint settings; env: AGENTIC_PRUNER_LLM_BASE_URL / _MODEL / ..., OPENAI_API_KEY.

    The API key is a ``SecretStr`` excluded from dumps and reprs; it is only ever sent as the
    ``Authorization`` header by the openai client.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTIC_PRUNER_LLM_", extra="ignore", populate_by_name=True)

    base_url: str | None = Field(None, description="e.g. https://openrouter.ai/api/v1 or http://localhost:8000/v1")
    model: str | None = Field(None, description="model name served by the endpoint")
    api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("OPENAI_API_KEY"), exclude=True, repr=False)
    timeout: float = Field(60.0, gt=0, description="seconds per HTTP request")
    max_retries: int = Field(2, ge=0, description="re-asks after an invalid (non-JSON / schema-violating) reply")
    http_retries: int = Field(1, ge=0, description="openai client retries on 5xx / timeouts / connection errors")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int | None = Field(1024, gt=0)
    json_mode: bool = Field(True, description="ask for response_format=json_object (dropped if the server rejects it)")
    fallback: bool = Field(False, description="unreachable endpoint at startup: warn and use the heuristic instead of failing")
    seed: int | None = None
    history_rows: int = Field(40, ge=1)


@register_strategist("llm")
class LLMStrategist(Strategist):
    """LLM Analysis Agent over the OpenAI chat-completions protocol."""

    def __init__(self, config: LLMConfig | None = None, *, fallback: bool | None = None,
                 fallback_strategist: Strategist | None = None, limits: SafetyLimits | None = None,
                 dataset: str | None = None, **config_overrides: Any):
        cfg = config or LLMConfig()
        unknown = sorted(set(config_overrides) - set(LLMConfig.model_fields))
        if unknown:
            raise TypeError(f"unknown LLMConfig fields {unknown}")
        if config_overrides:
            cfg = cfg.model_copy(update=config_overrides)
        if fallback is not None:
            cfg = cfg.model_copy(update={"fallback": fallback})
        self.config = cfg
        self.limits = limits or SafetyLimits.for_dataset(dataset)
        self.fallback_strategist = fallback_strategist or HeuristicStrategist(limits=self.limits)
        self.unavailable_reason: str | None = None
        self._use_response_format = cfg.json_mode
        self._client = None

    # -- client --------------------------------------------------------------------------------
    def _key(self) -> str | None:
        return self.config.api_key.get_secret_value() if self.config.api_key is not None else None

    @property
    def client(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(base_url=self.config.base_url, api_key=self._key() or "no-key",
                                  timeout=self.config.timeout, max_retries=self.config.http_retries)
        return self._client

    def _redact(self, text: str | None) -> str | None:
        key = self._key()
        if text and key and key in text:
            text = text.replace(key, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            what = f"request timed out after {self.config.timeout:g}s"
        elif isinstance(exc, openai.APIConnectionError):
            what = f"cannot connect to {self.config.base_url or 'the default endpoint'}"
        elif isinstance(exc, openai.APIStatusError):
            what = f"HTTP {exc.status_code}: {str(getattr(exc, 'message', exc)).splitlines()[0][:160]}"
        else:
            what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return self._redact(what) or what

    # -- startup check -------------------------------------------------------------------------
    def check(self) -> None:
        """GET /models (or a 1-token chat call if /models is missing). Raises :class:`LLMUnavailable`.

        With ``fallback=True`` a failure only warns; every revision then uses the heuristic
        strategist and records why.
        """
        import openai

        problem = None
        if not self.config.model:
            problem = "no LLM model configured (set AGENTIC_PRUNER_LLM_MODEL or LLMConfig(model=...))"
        else:
            try:
                models = self.client.with_options(max_retries=0).models.list()
                ids = [m.id for m in getattr(models, "data", [])]
                if ids and self.config.model not in ids:
                    problem = (f"model '{self.config.model}' is not served by {self.config.base_url}; "
                               f"available: {', '.join(ids[:10])}")
            except (openai.NotFoundError, openai.APIStatusError) as exc:
                if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
                    problem = f"LLM endpoint refused the API key ({self._describe(exc)})"
                elif getattr(exc, "status_code", None) in (404, 405, 501):
                    try:  # endpoint without /models: a one-token chat call
                        self.client.with_options(max_retries=0).chat.completions.create(
                            model=self.config.model, messages=[{"role": "user", "content": "ping"}], max_tokens=1)
                    except openai.OpenAIError as exc2:
                        problem = f"LLM endpoint unusable: {self._describe(exc2)}"
                else:
                    problem = f"LLM endpoint unusable: {self._describe(exc)}"
            except openai.OpenAIError as exc:
                problem = f"LLM endpoint unreachable: {self._describe(exc)}"
        if problem is None:
            self.unavailable_reason = None
            return
        if self.config.fallback:
            self.unavailable_reason = problem
            warnings.warn(f"{problem}; falling back to the heuristic strategist", RuntimeWarning, stacklevel=2)
            log.warning("%s; falling back to the heuristic strategist", problem)
            return
        raise LLMUnavailable(problem)

    # -- proposal ------------------------------------------------------------------------------
    def _fallback(self, ctx: StrategyContext, reason: str, raw: list[str], notes: list[str], attempts: int,
                  t0: float) -> Proposal:
        log.warning("revision %d: LLM strategist falls back to heuristic: %s", ctx.revision, reason)
        prop = self.fallback_strategist.propose(ctx)
        return prop.model_copy(update={
            "fallback_reason": reason,
            "raw_reply": redacted_raw(self, raw),
            "notes": notes + prop.notes, "attempts": attempts, "seconds": time.perf_counter() - t0,
        })

    def _profile_errors(self, strategy: AnyStrategy, ctx: StrategyContext) -> list[str]:
        """Context checks the schema cannot do (unknown stage names)."""
        errs = []
        stages = strategy.stage_multipliers or {}
        unknown = sorted(set(stages) - set(ctx.profile.stages))
        if unknown:
            errs.append(f"stage_multipliers: unknown stage names {unknown}; valid stages are {ctx.profile.stages}")
        return errs

    def propose(self, context: StrategyContext) -> Proposal:
        t0 = time.perf_counter()
        ctx = context
        if self.unavailable_reason:
            return self._fallback(ctx, f"LLM unavailable at startup: {self.unavailable_reason}", [], [], 0, t0)
        schema = strategy_model(ctx.profile.family)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": system_prompt(ctx.profile, ctx.band, self.limits)},
            {"role": "user", "content": user_prompt(ctx.profile, ctx.band, ctx.history, ctx.guidance, ctx.revision,
                                                    ctx.baseline_accuracy, self.config.history_rows, ctx.pending)},
        ]
        reply = ask_validated(self, messages, schema, reask=reask_prompt,
                              errors=lambda strategy: self._profile_errors(strategy, ctx),
                              convert=lambda strategy: (strategy, strategy.to_plan(ctx.base_plan)))
        if reply.failure is not None:
            return self._fallback(ctx, reply.failure, reply.raw, reply.notes, reply.attempts, t0)
        strategy, plan = reply.value
        return Proposal(strategy=strategy, plan=plan, strategist=self.name, raw_reply=reply.raw_reply,
                        notes=reply.notes, attempts=reply.attempts, seconds=time.perf_counter() - t0)
