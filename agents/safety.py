"""Safety validation (Section 3.4, Appendix A.3): every plan passes here before it is executed.

Pipeline (A.3.1): (1) individual limits per multiplier / rounding / criterion, (2) historical learning:
move the plan out of the Master's danger zones, (3) a final check of all hard limits, (4) guardrail:
if anything is still wrong the strategy is rejected and a guaranteed-safe fallback preset (A.3.4) is
used instead. An unsafe plan never leaves :meth:`SafetyValidator.validate` unclamped.

Because the MAC solver rescales the base ratio, the *effective* ratio of a group is only known
after solving; :meth:`SafetyValidator.repair_solution` checks it (QKV <= 85 %, any group <= the
layer cap) and lowers the offending multiplier until the solved allocation is safe.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel, Field

from agents.history import RevisionRecord, VerdictStatus, plan_coords
from agents.limits import SafetyLimits
from agents.profiling import ProfileSummary
from agents.schemas import CNNStrategy, DangerZone, MasterGuidance, ViTStrategy
from agents.zones import compute_danger_zones
from pruning.engine import solved_kind_ratios
from pruning.plan import PruningPlan, default_kind_multiplier
from pruning.solver import MacBand

if TYPE_CHECKING:  # pragma: no cover
    from pruning.solver import Solution  # noqa: F401
    from pruning.space import PruningSpace  # noqa: F401

__all__ = ["SafetyLimits", "Verdict", "UnsafePlanError", "SafetyValidator", "fallback_plan", "target_reduction",
           "solved_kind_ratios", "CNN_KINDS", "VIT_KINDS"]

CNN_KINDS = ("internal", "residual")
VIT_KINDS = ("mlp", "qkv", "head", "proj")


class Verdict(BaseModel):
    """Result of validation: the plan to execute and why it differs from the proposal."""

    status: VerdictStatus
    reasons: list[str] = Field(default_factory=list)
    plan: PruningPlan = Field(description="safe plan to execute (the fallback preset when rejected)")
    fallback_used: bool = False
    original_plan: PruningPlan | None = None


class UnsafePlanError(RuntimeError):
    """Internal invariant broken: a plan that should be safe is not (never raised for user input)."""


def _nearest(value: int, allowed: Sequence[int]) -> int:
    return min(allowed, key=lambda a: (abs(a - value), a))


def target_reduction(profile: ProfileSummary, band: MacBand | None) -> float:
    """Fraction of baseline MACs that must go (the paper's ``target_ratio``)."""
    if band is None:
        return 0.5
    return min(0.99, max(0.01, 1.0 - band.target_macs / profile.base_macs))


def fallback_plan(profile: ProfileSummary, band: MacBand | None, base_plan: PruningPlan | None = None,
                  dataset: str | None = None, limits: SafetyLimits | None = None) -> PruningPlan:
    """Guaranteed-safe preset (Appendix A.3.4), adapted to the engine's shape semantics."""
    base_plan = base_plan or PruningPlan()
    limits = limits or SafetyLimits.for_dataset(dataset or profile.dataset)
    tr = target_reduction(profile, band)
    imagenet = "imagenet" in (dataset or profile.dataset or "").lower()
    criterion = "taylor" if profile.taylor_available else "l2"
    data = base_plan.model_dump()
    data.update(importance=criterion, allocation="global", stage_multipliers={},
                max_layer_ratio=min(base_plan.max_layer_ratio, limits.max_layer_ratio))
    if profile.family == "vit":
        if imagenet:
            qkv, mlp = min(0.8, 0.25 / tr), min(1.0, 0.4 / tr)
        else:
            qkv, mlp = min(1.0, 0.5 / tr), min(1.4, 0.7 / tr)
        mlp = min(mlp, limits.kind_max.get("mlp", mlp))
        qkv = min(qkv, limits.kind_max.get("qkv", qkv), limits.qkv_over_mlp_max * mlp)
        data.update(kind_multipliers={"mlp": round(mlp, 4), "qkv": round(qkv, 4), "proj": 0.0, "head": 0.0},
                    round_to=8, min_head_dim=max(base_plan.min_head_dim, limits.min_head_dim))
    else:
        stages = {profile.first_stage: 0.5} if profile.first_stage and len(profile.stages) > 1 else {}
        min_ch = min(profile.min_channels_by_kind.values(), default=64)
        data.update(kind_multipliers={"internal": 1.0, "residual": 0.5}, stage_multipliers=stages,
                    round_to=8 if min_ch >= 16 else 1)
    return PruningPlan.model_validate(data)


class SafetyValidator:
    """Validate-and-correct (Algorithm 2, line 19)."""

    def __init__(self, limits: SafetyLimits | None = None, dataset: str | None = None):
        self.limits = limits or SafetyLimits.for_dataset(dataset)
        self.dataset = dataset

    # -- public ------------------------------------------------------------------------------
    def validate(
        self,
        candidate: Any,
        profile: ProfileSummary,
        history: Sequence[RevisionRecord] = (),
        *,
        guidance: MasterGuidance | None = None,
        base_plan: PruningPlan | None = None,
        band: MacBand | None = None,
    ) -> Verdict:
        """Turn a strategy / plan / proposal into a safe plan (accepted, clamped, or rejected -> preset)."""
        base_plan = base_plan or PruningPlan()
        reasons: list[str] = []
        try:
            plan = self._as_plan(candidate, base_plan)
        except (ValueError, TypeError) as exc:
            return self._reject([f"strategy is unusable: {str(exc).splitlines()[0][:200]}"], profile, band, base_plan, None)
        original = plan

        # ignored layers: a strategy may add known modules, never drop the ones that must stay unpruned
        dropped = sorted(set(base_plan.ignored_layers) - set(plan.ignored_layers))
        if dropped:
            return self._reject([f"strategy drops ignored layers {dropped} that must never be pruned"],
                                profile, band, base_plan, original)
        known = set(profile.known_modules)
        if known:
            unknown = sorted(set(plan.ignored_layers) - known)
            if unknown:
                reasons.append(f"ignored_layers {unknown} are not modules of the model; removed")
                plan = plan.model_copy(update={"ignored_layers": [n for n in plan.ignored_layers if n in known]})

        plan = self._clamp(plan, profile, reasons)

        zones = guidance.danger_zones if guidance is not None else self._zones(history, profile)
        escaped = self._escape_zones(plan, zones, profile, reasons)
        if escaped is None:
            return self._reject(reasons + ["no safe move leaves the danger zones of failed configurations"],
                                profile, band, base_plan, original)
        plan = escaped

        problems = self.violations(plan, profile)
        if problems:
            return self._reject(reasons + problems, profile, band, base_plan, original)
        plan = PruningPlan.model_validate(plan.model_dump())
        return Verdict(status="clamped" if reasons else "accepted", reasons=reasons, plan=plan, original_plan=original)

    def violations(self, plan: PruningPlan, profile: ProfileSummary, base_plan: PruningPlan | None = None) -> list[str]:
        """Hard-limit violations of a plan (empty list: safe to execute)."""
        L = self.limits
        out = []
        if plan.importance == "taylor" and not profile.taylor_available:
            out.append("taylor importance without calibration gradients")
        if plan.max_layer_ratio > L.max_layer_ratio + 1e-9:
            out.append(f"max_layer_ratio {plan.max_layer_ratio} > {L.max_layer_ratio}")
        unknown = sorted(set(plan.stage_multipliers) - set(profile.stages))
        if unknown:
            out.append(f"unknown stages {unknown}")
        for s, m in plan.stage_multipliers.items():
            if m > L.max_stage_multiplier + 1e-9:
                out.append(f"stage {s} multiplier {m} > {L.max_stage_multiplier}")
        fs = profile.first_stage
        if fs and len(profile.stages) > 1 and plan.stage_multipliers.get(fs, 1.0) > L.first_stage_max + 1e-9:
            out.append(f"first stage {fs} multiplier > {L.first_stage_max}")
        km = self._kinds(plan, profile)
        for k, m in km.items():
            if k in L.kind_max and m > L.kind_max[k] + 1e-9:
                out.append(f"{k} multiplier {m} > {L.kind_max[k]}")
        if profile.family == "vit":
            if km.get("head", 0.0) > 0:
                out.append("attention heads must not be pruned (head multiplier > 0)")
            if km.get("proj", 0.0) > 0:
                out.append("projection / embedding width must not be pruned (proj multiplier > 0)")
            if km.get("qkv", 0.0) > L.qkv_over_mlp_max * km.get("mlp", 0.0) + 1e-9:
                out.append(f"qkv multiplier above {L.qkv_over_mlp_max} x mlp multiplier")
            if plan.round_to not in L.vit_round_to:
                out.append(f"round_to {plan.round_to} not in {list(L.vit_round_to)} for transformer dims")
            if plan.min_head_dim < L.min_head_dim:
                out.append(f"min_head_dim {plan.min_head_dim} < {L.min_head_dim}")
        positive = [m for m in self._effective(plan, profile) if m > 0]
        if not positive:
            out.append("every group is kept (all multipliers 0): nothing can be pruned")
        if base_plan is not None:
            dropped = sorted(set(base_plan.ignored_layers) - set(plan.ignored_layers))
            if dropped:
                out.append(f"ignored layers dropped: {dropped}")
        return out

    def check_kind_ratios(self, kind_ratios: dict[str, float], family: str) -> list[str]:
        """Post-solve check of the largest effective pruning ratio per kind."""
        out = []
        for k, r in kind_ratios.items():
            if r > self.limits.max_layer_ratio + 1e-6:
                out.append(f"{k} groups pruned {r:.1%} > layer cap {self.limits.max_layer_ratio:.0%}")
        if family == "vit" and kind_ratios.get("qkv", 0.0) > self.limits.qkv_max_ratio + 1e-6:
            out.append(f"qkv pruned {kind_ratios['qkv']:.1%} > {self.limits.qkv_max_ratio:.0%}")
        return out

    def repair_solution(self, space: "PruningSpace", plan: PruningPlan, band: MacBand, solution: "Solution",
                        solve_fn, max_steps: int = 6) -> tuple[PruningPlan, "Solution", list[str]]:
        """Make the *solved* allocation respect the ratio limits, re-solving as needed; returns notes.

        A QKV ratio above ``qkv_max_ratio`` lowers the qkv multiplier; any ratio above the layer cap
        (channel rounding can overshoot ``max_layer_ratio`` by one step) lowers ``max_layer_ratio``.
        ``solve_fn(space, plan, band) -> Solution`` may raise ``InfeasibleTarget`` (the target is not
        reachable within the limits). Raises :class:`UnsafePlanError` if it cannot repair.
        """
        notes: list[str] = []
        vit = space.family == "vit"
        for _ in range(max_steps):
            ratios = solved_kind_ratios(space, solution)
            bad = self.check_kind_ratios(ratios, space.family)
            if not bad:
                return plan, solution, notes
            update: dict[str, Any] = {}
            qkv = ratios.get("qkv", 0.0)
            if vit and qkv > self.limits.qkv_max_ratio + 1e-6:
                km = dict(plan.kind_multipliers)
                km["qkv"] = round(plan.multiplier("", "qkv") * 0.85 * self.limits.qkv_max_ratio / qkv, 4)
                update["kind_multipliers"] = km
            worst = max(ratios.values(), default=0.0)
            if worst > self.limits.max_layer_ratio + 1e-6:
                update["max_layer_ratio"] = round(max(0.05, plan.max_layer_ratio - (worst - self.limits.max_layer_ratio)
                                                      - 0.01), 4)
            if not update:  # pragma: no cover - check_kind_ratios and the branches above agree
                break
            notes.append(f"solved allocation unsafe ({'; '.join(bad)}): "
                         + ", ".join(f"{k} -> {v}" for k, v in update.items()))
            plan = plan.model_copy(update=update)
            solution = solve_fn(space, plan, band)
        ratios = solved_kind_ratios(space, solution)
        bad = self.check_kind_ratios(ratios, space.family)
        if bad:
            raise UnsafePlanError("cannot make the solved allocation safe: " + "; ".join(bad))
        return plan, solution, notes

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _as_plan(candidate: Any, base_plan: PruningPlan) -> PruningPlan:
        if isinstance(candidate, PruningPlan):
            return candidate
        if isinstance(candidate, (CNNStrategy, ViTStrategy)):
            return candidate.to_plan(base_plan)
        plan = getattr(candidate, "plan", None)  # a Proposal
        if isinstance(plan, PruningPlan):
            return plan
        strategy = getattr(candidate, "strategy", None)
        if isinstance(strategy, (CNNStrategy, ViTStrategy)):
            return strategy.to_plan(base_plan)
        raise TypeError(f"cannot validate a {type(candidate).__name__}")

    @staticmethod
    def _kinds(plan: PruningPlan, profile: ProfileSummary) -> dict[str, float]:
        return {k: plan.kind_multipliers.get(k, default_kind_multiplier(k)) for k in profile.kinds + (
            ["head", "proj"] if profile.family == "vit" else [])}

    @staticmethod
    def _effective(plan: PruningPlan, profile: ProfileSummary) -> list[float]:
        kinds = profile.kinds or ["internal"]
        return [plan.multiplier(s, k) for s in (profile.stages or [""]) for k in kinds]

    def _clamp(self, plan: PruningPlan, profile: ProfileSummary, reasons: list[str]) -> PruningPlan:
        L = self.limits
        data = plan.model_dump()
        if plan.importance == "taylor" and not profile.taylor_available:
            data["importance"] = "l2"
            reasons.append("taylor importance needs calibration gradients (not available): using l2")
        # stages
        stages = {}
        for s, m in plan.stage_multipliers.items():
            if s not in profile.stages:
                reasons.append(f"unknown stage '{s}' dropped (stages: {', '.join(profile.stages)})")
                continue
            if m > L.max_stage_multiplier:
                reasons.append(f"stage {s} multiplier {m:g} clamped to {L.max_stage_multiplier:g}")
                m = L.max_stage_multiplier
            stages[s] = m
        fs = profile.first_stage
        if fs and len(profile.stages) > 1 and stages.get(fs, 1.0) > L.first_stage_max:
            reasons.append(f"first stage {fs} multiplier {stages.get(fs, 1.0):g} clamped to {L.first_stage_max:g} (protected)")
            stages[fs] = L.first_stage_max
        data["stage_multipliers"] = stages
        # kinds
        allowed = VIT_KINDS if profile.family == "vit" else CNN_KINDS
        kinds = {}
        for k, m in plan.kind_multipliers.items():
            if k not in allowed:
                if m != default_kind_multiplier(k):
                    reasons.append(f"kind '{k}' does not exist in a {profile.family} model; dropped")
                continue
            if k in L.kind_max and m > L.kind_max[k]:
                reasons.append(f"{k} multiplier {m:g} clamped to {L.kind_max[k]:g}")
                m = L.kind_max[k]
            kinds[k] = m
        if profile.family == "vit":
            for k in ("head", "proj"):
                if kinds.get(k, 0.0) > 0:
                    reasons.append(f"{k} multiplier {kinds[k]:g} set to 0 ("
                                   + ("attention heads are preserved" if k == "head" else
                                      "the embedding width is tied to the never-pruned stem") + ")")
                kinds[k] = 0.0
            mlp = kinds.get("mlp", default_kind_multiplier("mlp"))
            qkv = kinds.get("qkv", default_kind_multiplier("qkv"))
            cap = round(L.qkv_over_mlp_max * mlp, 4)
            if qkv > cap + 1e-9:
                reasons.append(f"qkv multiplier {qkv:g} above {L.qkv_over_mlp_max:g} x mlp multiplier ({mlp:g}): "
                               f"clamped to {cap:g} (QKV pruning collapses accuracy; MLP is more robust)")
                kinds["qkv"] = cap
            if plan.round_to not in L.vit_round_to:
                rt = _nearest(plan.round_to, L.vit_round_to)
                reasons.append(f"round_to {plan.round_to} not allowed for transformer dims; using {rt}")
                data["round_to"] = rt
            if plan.min_head_dim < L.min_head_dim:
                reasons.append(f"min_head_dim {plan.min_head_dim} raised to {L.min_head_dim}")
                data["min_head_dim"] = L.min_head_dim
        else:
            min_ch = min((profile.min_channels_by_kind.get(k, 10**9) for k in profile.kinds), default=10**9)
            limit = max(1, min_ch // 2)
            if plan.round_to > limit:
                rt = max(c for c in (1, 2, 4, 8, 16, 32) if c <= limit)
                reasons.append(f"round_to {plan.round_to} too coarse for {min_ch}-channel groups; using {rt}")
                data["round_to"] = rt
        data["kind_multipliers"] = kinds
        if plan.max_layer_ratio > L.max_layer_ratio:
            reasons.append(f"max_layer_ratio {plan.max_layer_ratio:g} clamped to {L.max_layer_ratio:g}")
            data["max_layer_ratio"] = L.max_layer_ratio
        return PruningPlan.model_validate(data)

    def _zones(self, history: Sequence[RevisionRecord], profile: ProfileSummary) -> list[DangerZone]:
        return compute_danger_zones(history, profile, self.limits.danger_tolerance)

    def _in_zone(self, plan: PruningPlan, zones: Sequence[DangerZone], profile: ProfileSummary) -> DangerZone | None:
        coords = plan_coords(plan, profile.stages, profile.kinds)
        for z in zones:
            if z.contains(coords, plan.importance, plan.round_to, plan.allocation):
                return z
        return None

    def _escape_zones(self, plan: PruningPlan, zones: Sequence[DangerZone], profile: ProfileSummary,
                      reasons: list[str]) -> PruningPlan | None:
        """Move the plan out of every danger zone by lowering its most aggressive coordinate."""
        if not zones:
            return plan
        for _ in range(8):
            zone = self._in_zone(plan, zones, profile)
            if zone is None:
                return plan
            moved = self._move_out(plan, zone, zones, profile)
            if moved is None:
                return None
            plan, how = moved
            reasons.append(f"inside danger zone of revision {zone.revision} ({zone.reason}): {how}")
        return plan if self._in_zone(plan, zones, profile) is None else None

    def _move_out(self, plan: PruningPlan, zone: DangerZone, zones: Sequence[DangerZone],
                  profile: ProfileSummary) -> tuple[PruningPlan, str] | None:
        """Lower one coordinate (the zone's blame first, then the most aggressive) just below the zone."""
        coords = plan_coords(plan, profile.stages, profile.kinds)
        raw = {f"stage:{s}": plan.stage_multipliers.get(s, 1.0) for s in profile.stages}
        raw.update({f"kind:{k}": plan.kind_multipliers.get(k, default_kind_multiplier(k)) for k in profile.kinds})
        keys = sorted((k for k in coords if coords[k] > 0), key=lambda k: (k != zone.blame, -coords[k], k))
        for key in keys:
            fam, name = key.split(":", 1)
            target = zone.coords.get(key, coords[key]) - zone.tolerance - 0.02  # normalised value to reach
            if target <= 0:
                continue
            others = [v for k, v in raw.items() if k.startswith(fam + ":") and k != key]
            top_other = max(others, default=0.0)
            if top_other <= 0:
                continue  # the only positive member of its family: its normalised value cannot change
            fam_max = max(top_other, raw[key])
            # lowering the family maximum makes the runner-up the new reference
            new_raw = round(target * (top_other if raw[key] >= fam_max else fam_max), 4)
            if new_raw >= raw[key] - 1e-6:
                continue
            field = "stage_multipliers" if fam == "stage" else "kind_multipliers"
            upd = dict(getattr(plan, field))
            upd[name] = new_raw
            cand = plan.model_copy(update={field: upd})
            if self.violations(cand, profile):
                continue
            if not zone.contains(plan_coords(cand, profile.stages, profile.kinds), cand.importance, cand.round_to,
                                 cand.allocation):
                return cand, f"{key} lowered {raw[key]:g} -> {new_raw:g}"
        # last resort: another rounding granularity is another configuration
        alts = self.limits.vit_round_to if profile.family == "vit" else (4, 8, 16)
        for rt in alts:
            if rt != plan.round_to:
                cand = plan.model_copy(update={"round_to": rt})
                if not self.violations(cand, profile) and self._in_zone(cand, zones, profile) is None:
                    return cand, f"round_to {plan.round_to} -> {rt}"
        return None

    def _reject(self, reasons: list[str], profile: ProfileSummary, band: MacBand | None, base_plan: PruningPlan,
                original: PruningPlan | None) -> Verdict:
        preset = fallback_plan(profile, band, base_plan, self.dataset, self.limits)
        bad = self.violations(preset, profile)
        if bad:
            raise UnsafePlanError("fallback preset violates limits: " + "; ".join(bad))
        return Verdict(status="rejected", reasons=reasons + ["using the safe fallback preset (A.3.4)"], plan=preset,
                       fallback_used=True, original_plan=original)

