"""The heuristic Analysis Agent: deterministic, offline hill-climbing over plan shapes."""
from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from agents.history import RevisionRecord, plan_coords, plan_signature
from agents.limits import SafetyLimits
from agents.master import move_effects, rank_key
from agents.profiling import ProfileSummary
from agents.safety import fallback_plan
from agents.schemas import strategy_from_plan
from agents.strategists.base import (
    Proposal,
    StrategiesExhausted,
    Strategist,
    StrategyContext,
    coord_value,
    register_strategist,
    with_coord,
)
from pruning.plan import PruningPlan

__all__ = ["HeuristicStrategist"]

#: a chosen plan: (plan, move, parent revision, why)
Choice = tuple[PruningPlan, str, int | None, str]
Usable = Callable[[PruningPlan], bool]


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
        reduction = 1.0 - ctx.band.target_macs / p.base_macs
        if p.family == "vit":
            # qkv at half the mlp rate (attention is the more sensitive), unless the budget is so tight that this
            # shape cannot reach it (a small ViT at 80 % reduction): then qkv as hard as the limits allow.
            qkv = min(1.0, self.limits.qkv_over_mlp_max) if reduction >= 0.75 else 0.5
            data.update(kind_multipliers={"mlp": 1.0, "qkv": qkv, "proj": 0.0, "head": 0.0}, stage_multipliers={},
                        round_to=base.round_to if base.round_to in self.limits.vit_round_to else 8,
                        min_head_dim=max(base.min_head_dim, self.limits.min_head_dim))
        else:
            # Protect residual streams and the first stage, unless the budget is so tight that a protective
            # shape cannot reach it (e.g. ConvNeXt-B at 1.12 G = 93 % reduction): then prune uniformly.
            protect = 0.5 if reduction < 0.8 else 1.0
            kinds = {"internal": 1.0}
            if "residual" in p.kinds:
                kinds["residual"] = protect
            stages = {p.first_stage: protect} if p.first_stage and len(p.stages) > 1 and protect < 1 else {}
            min_ch = min(p.min_channels_by_kind.values(), default=64)
            limit = max(1, min_ch // 2)
            rt = base.round_to if base.round_to <= limit else max(c for c in (1, 2, 4, 8, 16, 32) if c <= limit)
            data.update(kind_multipliers=kinds, stage_multipliers=stages, round_to=rt)
        data["stage_multipliers"] = self._sensitivity_shape(p, data["stage_multipliers"])
        return PruningPlan.model_validate(data)

    SENS_MIN, SENS_MAX = 0.6, 1.5  # bounds of the factor sensitivity puts on a stage multiplier

    def _sensitivity_shape(self, p: ProfileSummary, stages: dict[str, float]) -> dict[str, float]:
        """Stage multipliers scaled by ``sensitivity ** -0.5`` (clipped): stages whose weights carry more Taylor
        saliency per MAC are pruned less, cheap ones more (the first stage stays within its cap)."""
        if not p.sensitivity_by_stage or len(p.stages) < 2:
            return stages
        out = dict(stages)
        for s in p.stages:
            sens = p.sensitivity_by_stage.get(s)
            if not sens or sens <= 0:
                continue
            f = min(self.SENS_MAX, max(self.SENS_MIN, sens ** -0.5))
            cap = self.limits.first_stage_max if s == p.first_stage else self.limits.max_stage_multiplier
            out[s] = round(min(cap, stages.get(s, 1.0) * f), 4)
        return out

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
        if p.sensitivity_by_stage and len(p.stages) > 1:  # the evidence first: spare the most sensitive stage,
            ranked = sorted(p.sensitivity_by_stage, key=lambda s: (-p.sensitivity_by_stage[s], s))  # load the least
            moves = [f"stage:{ranked[0]}-", f"stage:{ranked[-1]}+"] + moves
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
        cur = coord_value(plan, key)
        if cur <= 0:
            return None
        val = cur * (factor if factor is not None else (self.UP if direction == "+" else self.DOWN))
        fam, name = key.split(":", 1)
        if fam == "stage":
            cap = L.first_stage_max if name == p.first_stage else L.max_stage_multiplier
        else:
            cap = L.kind_max.get(name, 10.0)
            if name == "qkv":
                cap = min(cap, L.qkv_over_mlp_max * coord_value(plan, "kind:mlp"))
        val = min(val, cap)
        if abs(val - cur) < 1e-4:
            return None
        new = with_coord(plan, key, val)
        if fam == "kind" and name == "mlp" and p.family == "vit":  # keep qkv <= ratio x mlp
            q = coord_value(new, "kind:qkv")
            if q > L.qkv_over_mlp_max * val:
                new = with_coord(new, "kind:qkv", L.qkv_over_mlp_max * val)
        return new

    @staticmethod
    def _opposite(move: str) -> str | None:
        if move and move[-1] in "+-" and move.startswith(("stage:", "kind:")):
            return move[:-1] + ("-" if move[-1] == "+" else "+")
        return None

    # -- learning from history ----------------------------------------------------------------
    def _effects(self, history: Sequence[RevisionRecord]) -> dict[str, float]:
        """move -> accuracy change vs. its parent (-inf for collapse / failure); see :func:`move_effects`."""
        return move_effects(history)

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

    def _choose(self, ctx: StrategyContext, usable: Usable) -> Choice | None:
        """The first usable plan of: revision 0's shape; phase 1's options (no in-band result yet); single
        moves from the parent (the best in-band revision); two-move combinations; seeded perturbations."""
        p, hist = ctx.profile, ctx.history
        initial = self.initial_plan(ctx)
        if not hist and usable(initial):
            return initial, "initial", None, "revision 0: default shape " + self._shape_text(initial)
        cands = [r for r in hist if r.is_candidate]
        protective: list[str] = []
        if not cands:  # phase 1: reach the band
            for plan, mv, why in self._phase1_options(ctx, initial):
                if usable(plan):
                    return plan, mv, None, why
            parent_rec, parent_plan = None, initial
        else:
            parent_rec = min([r for r in cands if not r.collapsed] or cands, key=rank_key)
            parent_plan = parent_rec.plan
            if parent_rec.collapsed:  # every candidate collapsed: protect the fragile parts first
                protective = self._protective_moves(p)
        effects = self._effects(hist)
        bad = {m for m, d in effects.items() if d < -self.EPS}
        good = [m for m, d in effects.items() if d > self.EPS]
        parent_rev = parent_rec.revision if parent_rec is not None else None
        return (self._single_move(ctx, usable, parent_rec, parent_plan, protective, effects, bad, good)
                or self._combined_move(p, usable, parent_plan, parent_rev, bad)
                or self._random_move(ctx, usable, parent_plan, parent_rev))

    def _phase1_options(self, ctx: StrategyContext, initial: PruningPlan) -> list[tuple[PruningPlan, str, str]]:
        """Phase 1 (no in-band result yet): finer rounding of a near miss, the initial shape, a uniform
        shape, then the safe fallback preset; as ``(plan, move, why)``."""
        p, hist = ctx.profile, ctx.history
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
        return options

    @staticmethod
    def _protective_moves(p: ProfileSummary) -> list[str]:
        """Moves that prune the fragile parts less (QKV / residual channels, the first stage)."""
        protective = ["kind:qkv-"] if p.family == "vit" else ["kind:residual-"]
        if p.first_stage and len(p.stages) > 1:
            protective.append(f"stage:{p.first_stage}-")
        return protective

    def _single_move(self, ctx: StrategyContext, usable: Usable, parent_rec: RevisionRecord | None,
                     parent_plan: PruningPlan, protective: list[str], effects: dict[str, float], bad: set[str],
                     good: list[str]) -> Choice | None:
        """Hill-climbing step: protective moves, momentum, opposites of harmful moves, then the move lists."""
        p, hist = ctx.profile, ctx.history
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
        return None

    def _combined_move(self, p: ProfileSummary, usable: Usable, parent_plan: PruningPlan, parent_rev: int | None,
                       bad: set[str]) -> Choice | None:
        """Two-move combinations of non-harmful coordinate moves."""
        singles = [m for m in self._coordinate_moves(p) if m not in bad]
        for i, a in enumerate(singles):
            for b in singles[i + 1:]:
                if a[:-1] == b[:-1]:
                    continue
                first = self.apply_move(parent_plan, a, p)
                new = self.apply_move(first, b, p) if first is not None else None
                if new is not None and usable(new):
                    return new, f"{a}&{b}", parent_rev, f"from revision {parent_rev}: combined {a} and {b}"
        return None

    def _random_move(self, ctx: StrategyContext, usable: Usable, parent_plan: PruningPlan,
                     parent_rev: int | None) -> Choice | None:
        """Seeded random perturbations of one coordinate (seed and revision fix the sequence)."""
        p = ctx.profile
        keys = sorted({m[:-1] for m in self._coordinate_moves(p)})
        rng = random.Random(f"{ctx.seed}:{ctx.revision}")
        for _ in range(40):
            if not keys:
                break
            key = rng.choice(keys)
            factor = rng.choice((0.5, 0.7, 1.3, 1.6))
            mv = f"{key}{'+' if factor > 1 else '-'}"
            cur = coord_value(parent_plan, key)
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
