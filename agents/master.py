"""Master Agent (Section 3.2.2, Algorithm 2): progress, collapse, danger zones, two-phase search, stop.

Deterministic: the same history always gives the same guidance, which keeps resumed searches
reproducible. Its output is a :class:`~agents.schemas.MasterGuidance` (the master prompt's JSON plus
structured fields the strategists use).

Accuracies are fractions in [0, 1]; a collapse is a drop of more than ``collapse_drop`` (0.10 = 10
points) below the baseline accuracy.
"""
from __future__ import annotations

import re
import statistics
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from agents.history import RevisionRecord, plan_coords
from agents.profiling import ProfileSummary
from agents.schemas import DangerZone, MasterGuidance
from pruning.solver import MacBand

_MOVE = re.compile(r"^((?:stage|kind):[^+\-*]+)[+-]$")


class MasterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_revisions: int = Field(10, ge=1, description="R_max")
    extra_revisions: int = Field(4, ge=0, description="phase 2: revisions explored after the first valid one (paper: 30)")
    collapse_drop: float = Field(0.10, gt=0, description="accuracy drop (fraction) from baseline that counts as collapse")
    early_stop_window: int = Field(3, ge=2, description="consecutive in-band revisions for early stop")
    early_stop_acc_range: float = Field(0.01, ge=0, description="max accuracy spread over that window")
    stagnation_window: int = Field(2, ge=1)
    stagnation_min_gain_pct: float = Field(0.5, ge=0, description="|MAC error| must shrink by this many % points")
    danger_tolerance: float = Field(0.05, ge=0)
    trap_window: int = 5
    trap_collapses: int = 3


def is_collapsed(accuracy: float | None, baseline: float | None, drop: float = 0.10) -> bool:
    """``baseline - accuracy > drop`` (both fractions); False when either is unknown."""
    if accuracy is None or baseline is None:
        return False
    return (baseline - accuracy) > drop


def rank_key(r: RevisionRecord) -> tuple:
    """Sort key, best first: accuracy desc, then |MAC error| asc, then earlier revision."""
    acc = r.accuracy
    err = abs(r.error_pct) if r.error_pct is not None else float("inf")
    return (0 if acc is not None else 1, -(acc if acc is not None else 0.0), err, r.revision)


def select_best(history: Sequence[RevisionRecord]) -> RevisionRecord | None:
    """argmax accuracy over candidates C; without any, argmin |M - M_target| over H (Algorithm 2, 45-49)."""
    cands = [r for r in history if r.is_candidate]
    if cands:
        healthy = [r for r in cands if not r.collapsed] or cands
        return min(healthy, key=rank_key)
    measured = [r for r in history if r.error_pct is not None]
    if measured:
        return min(measured, key=lambda r: (abs(r.error_pct), r.revision))
    return None


def _blame(r: RevisionRecord, profile: ProfileSummary) -> str | None:
    m = _MOVE.match(r.move or "")
    if m:
        return m.group(1)  # 'kind:qkv+' -> 'kind:qkv'
    if profile.family == "vit" and "qkv" in profile.kinds and r.plan.kind_multipliers.get("qkv", 1.0) > 0:
        return "kind:qkv"
    if "residual" in profile.kinds and r.plan.kind_multipliers.get("residual", 1.0) > 0:
        return "kind:residual"
    return f"stage:{profile.first_stage}" if profile.first_stage else None


def compute_danger_zones(history: Sequence[RevisionRecord], profile: ProfileSummary,
                         tolerance: float = 0.05) -> list[DangerZone]:
    """A.3.3 (3): a ±tolerance box around each collapsed, infeasible, failed or rejected configuration."""
    zones = []
    for r in history:
        if r.collapsed:
            reason = f"accuracy collapse ({r.accuracy:.3f})" if r.accuracy is not None else "accuracy collapse"
        elif r.status in ("infeasible", "error", "rejected") and not r.is_duplicate:
            reason = f"{r.status}: {(r.error or '')[:80]}".rstrip(": ")
        else:
            continue
        zones.append(DangerZone(
            revision=r.revision, reason=reason, importance=r.plan.importance, round_to=r.plan.round_to,
            allocation=r.plan.allocation, coords=plan_coords(r.plan, profile.stages, profile.kinds),
            blame=_blame(r, profile) if r.collapsed else None, tolerance=tolerance,
        ))
    return zones


def per_revision(history: Sequence[RevisionRecord]) -> list[RevisionRecord]:
    """One representative record per revision (its best candidate), in revision order.

    With K candidates per revision the search's progress, stagnation and stopping rules look at
    revisions, not at individual candidates; with K = 1 this is the history itself.
    """
    groups: dict[int, list[RevisionRecord]] = {}
    for r in history:
        groups.setdefault(r.revision, []).append(r)
    return [select_best(g) or min(g, key=lambda r: r.candidate) for _, g in sorted(groups.items())]


class MasterAgent:
    """Coordinates the search: call :meth:`analyze` before every revision."""

    def __init__(self, config: MasterConfig | None = None, **overrides):
        config = config or MasterConfig()
        if overrides:  # validated (typos are errors)
            config = MasterConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config

    def is_collapsed(self, accuracy: float | None, baseline: float | None) -> bool:
        return is_collapsed(accuracy, baseline, self.config.collapse_drop)

    select_best = staticmethod(select_best)

    # ----------------------------------------------------------------------------------------
    def analyze(self, history: Sequence[RevisionRecord], band: MacBand, profile: ProfileSummary,
                baseline_accuracy: float | None = None) -> MasterGuidance:
        cfg = self.config
        records = sorted(history, key=lambda r: (r.revision, r.candidate))
        hist = per_revision(records)
        n = len(hist)
        g = MasterGuidance(target_macs=band.target_macs, global_pruning=True)
        g.multiplier_tuning_order = self._tuning_order(profile)

        # -- MAC progress: Δr and error groups ----------------------------------------------
        groups: dict[str, list[int]] = {"in_band": [], "overshoot": [], "undershoot": [], "failed": []}
        for r in hist:
            if r.status != "ok" or r.error_pct is None:
                groups["failed"].append(r.revision)
            elif r.in_band:
                groups["in_band"].append(r.revision)
            elif r.error_pct > 0:
                groups["overshoot"].append(r.revision)
            else:
                groups["undershoot"].append(r.revision)
        g.mac_error_groups = {k: v for k, v in groups.items() if v}
        errs = [abs(r.error_pct) if (r.error_pct is not None and r.status == "ok") else None for r in hist]
        deltas = []
        for a, b in zip(errs, errs[1:]):
            deltas.append(None if a is None or b is None else b - a)
        g.delta_r = deltas[-1] if deltas else None

        first_valid = next((r.revision for r in hist if r.is_candidate), None)
        g.first_valid_revision = first_valid
        best = select_best(records)
        g.best_revision = best.revision if best is not None and best.is_candidate else None
        g.phase = "find_valid" if first_valid is None else "explore"
        if first_valid is not None:
            g.remaining_extra = max(0, cfg.extra_revisions - (hist[-1].revision - first_valid))

        # -- collapse, trap, stagnation -------------------------------------------------------
        last = hist[-1] if hist else None
        g.collapse_detected = bool(last is not None and last.collapsed)
        recent = hist[-cfg.trap_window:]
        trap = (best is not None and best.is_candidate and not best.collapsed
                and sum(1 for r in recent if r.collapsed) >= cfg.trap_collapses)
        if first_valid is None and n >= cfg.stagnation_window + 1:
            window = deltas[-cfg.stagnation_window:]
            g.stagnating = all(d is None or d > -cfg.stagnation_min_gain_pct for d in window)
        g.danger_zones = compute_danger_zones(records, profile, cfg.danger_tolerance)

        # -- stopping ---------------------------------------------------------------------------
        stop = None
        if n >= cfg.max_revisions:
            stop = f"maximum revisions reached ({cfg.max_revisions})"
        elif first_valid is not None and hist[-1].revision - first_valid >= cfg.extra_revisions:
            stop = (f"two-phase search complete: first valid revision {first_valid}, "
                    f"{cfg.extra_revisions} more explored")
        else:
            win = hist[-cfg.early_stop_window:]
            if (len(win) == cfg.early_stop_window and all(r.is_candidate and r.accuracy is not None for r in win)):
                accs = [r.accuracy for r in win]
                spread = max(accs) - min(accs)
                if spread <= cfg.early_stop_acc_range:
                    stop = (f"MAC convergence: {cfg.early_stop_window} consecutive revisions in band with accuracy "
                            f"spread {spread:.4f} <= {cfg.early_stop_acc_range}")
        if stop:
            g.continue_search, g.stop_reason, g.phase, g.recommended_action = False, stop, "done", "stop"
        elif g.collapse_detected:
            g.recommended_action = "conservative_fallback"
        elif trap or g.stagnating:
            g.recommended_action = "diversify"
        elif first_valid is not None:
            g.recommended_action = "refine"
        else:
            g.recommended_action = "explore"

        # -- notes / rationale --------------------------------------------------------------
        notes = []
        if g.collapse_detected and last is not None:
            base = f"{baseline_accuracy:.3f}" if baseline_accuracy is not None else "?"
            notes.append(f"revision {last.revision} collapsed (accuracy {last.accuracy} vs baseline {base}): "
                         "back off the most aggressive multiplier, return to the best configuration")
        if trap:
            notes.append("local optimum trap: several collapses after a good result; diversify instead of micro-steps")
        if g.stagnating:
            notes.append("MAC error is not shrinking: change the shape (spread pruning over more groups)")
        if g.danger_zones:
            notes.append("avoid (±%.2f) configurations of revisions %s" % (
                cfg.danger_tolerance, ", ".join(str(z.revision) for z in g.danger_zones)))
        if g.phase == "explore" and not stop:
            notes.append(f"phase 2: explore shapes near revision {g.best_revision} for accuracy; "
                         f"{g.remaining_extra} revision(s) left")
        g.notes = notes
        g.rationale = (stop or f"phase {g.phase}; action {g.recommended_action}") + (
            f"; best so far revision {g.best_revision} (acc {best.accuracy})" if g.best_revision is not None else "")
        return g

    def should_stop(self, history: Sequence[RevisionRecord], band: MacBand, profile: ProfileSummary,
                    baseline_accuracy: float | None = None) -> tuple[bool, str | None]:
        g = self.analyze(history, band, profile, baseline_accuracy)
        return (not g.continue_search, g.stop_reason)

    @staticmethod
    def _tuning_order(profile: ProfileSummary) -> list[str]:
        if profile.family == "vit":
            return ["mlp_multiplier", "qkv_multiplier"]
        kinds = sorted(profile.mac_share_by_kind, key=lambda k: -profile.mac_share_by_kind[k]) or profile.kinds
        stages = sorted(profile.stages, key=lambda s: -profile.mac_share_by_stage.get(s, 0.0))
        return [f"kind_multipliers.{k}" for k in kinds] + [f"stage_multipliers.{s}" for s in stages]


def accuracy_spread(records: Sequence[RevisionRecord]) -> float | None:
    accs = [r.accuracy for r in records if r.accuracy is not None]
    return statistics.pstdev(accs) if len(accs) > 1 else None
