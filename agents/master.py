"""Master Agent (Section 3.2.2, Algorithm 2): progress, collapse, danger zones, two-phase search, stop.

Deterministic: the same history always gives the same guidance, which keeps resumed searches
reproducible. Its output is a :class:`~agents.schemas.MasterGuidance` (the master prompt's JSON plus
structured fields the strategists use).

Accuracies are fractions in [0, 1]; a collapse is a drop of more than ``collapse_drop`` (0.10 = 10
points) below the baseline accuracy.
"""
from __future__ import annotations

from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from agents.history import RevisionRecord
from agents.profiling import ProfileSummary
from agents.schemas import MasterGuidance
from agents.zones import compute_danger_zones
from pruning.solver import MacBand
from pruning.train import accuracy_collapsed


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


def rank_key(r: RevisionRecord) -> tuple:
    """Sort key, best first: the highest successive-halving rung reached (a candidate stopped early was
    fine-tuned less, so its accuracy is not comparable), accuracy desc, |MAC error| asc, earlier revision."""
    acc = r.accuracy
    err = abs(r.error_pct) if r.error_pct is not None else float("inf")
    return (0 if acc is not None else 1, -r.rung, -(acc if acc is not None else 0.0), err, r.revision)


def select_best(history: Sequence[RevisionRecord]) -> RevisionRecord | None:
    """argmax accuracy over candidates C; without any, argmin |M - M_target| over H (Algorithm 2, 45-49)."""
    cands = [r for r in history if r.is_candidate]
    if cands:  # successive halving: only the candidates that reached the highest rung compete (equal fine-tuning)
        top = max(r.rung for r in cands)
        cands = [r for r in cands if r.rung == top]
        healthy = [r for r in cands if not r.collapsed] or cands
        return min(healthy, key=rank_key)
    measured = [r for r in history if r.error_pct is not None]
    if measured:
        return min(measured, key=lambda r: (abs(r.error_pct), r.revision))
    return None


def move_effects(history: Sequence[RevisionRecord]) -> dict[str, float]:
    """Which moves cost accuracy: heuristic move -> worst accuracy change of a record made with it vs. its parent
    revision's best candidate (-inf when it collapsed or left the band), compared at the highest
    successive-halving rung both reached (equal fine-tuning)."""
    by_rev = {r.revision: r for r in per_revision(history)}
    eff: dict[str, float] = {}
    for r in history:
        if not r.move or r.parent_revision is None or r.parent_revision not in by_rev:
            continue
        parent = by_rev[r.parent_revision]
        if not r.is_candidate or (r.collapsed and not parent.collapsed):
            d = float("-inf")
        else:
            k = min(r.rung, parent.rung)
            a, b = r.accuracy_at(k), parent.accuracy_at(k)
            if a is None or b is None:
                continue
            d = a - b
        eff[r.move] = min(eff.get(r.move, d), d)
    return eff


def per_revision(history: Sequence[RevisionRecord]) -> list[RevisionRecord]:
    """One representative record per revision (its best candidate), in revision order.

    With K candidates per revision the search's progress, stagnation and stopping rules look at
    revisions, not at individual candidates; with K = 1 this is the history itself.
    """
    groups: dict[int, list[RevisionRecord]] = {}
    for r in history:
        groups.setdefault(r.revision, []).append(r)
    return [select_best(g) or min(g, key=lambda r: r.candidate) for _, g in sorted(groups.items())]


def _mac_error_groups(hist: Sequence[RevisionRecord]) -> dict[str, list[int]]:
    """Revisions by MAC outcome: ``in_band`` / ``overshoot`` / ``undershoot`` / ``failed`` (empty groups left out)."""
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
    return {k: v for k, v in groups.items() if v}


def _error_deltas(hist: Sequence[RevisionRecord]) -> list[float | None]:
    """Δr: change of |MAC error| (% points) from one revision to the next (None around a failed one)."""
    errs = [abs(r.error_pct) if (r.error_pct is not None and r.status == "ok") else None for r in hist]
    return [None if a is None or b is None else b - a for a, b in zip(errs, errs[1:])]


class MasterAgent:
    """Coordinates the search: call :meth:`analyze` before every revision."""

    def __init__(self, config: MasterConfig | None = None, **overrides):
        config = config or MasterConfig()
        if overrides:  # validated (typos are errors)
            config = MasterConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config

    def is_collapsed(self, accuracy: float | None, baseline: float | None) -> bool:
        """``baseline - accuracy > collapse_drop`` (both fractions); False when either is unknown."""
        if accuracy is None or baseline is None:
            return False
        return accuracy_collapsed(baseline, accuracy, self.config.collapse_drop)

    select_best = staticmethod(select_best)

    # ----------------------------------------------------------------------------------------
    def analyze(self, history: Sequence[RevisionRecord], band: MacBand, profile: ProfileSummary,
                baseline_accuracy: float | None = None) -> MasterGuidance:
        """The guidance for the next revision: progress, phase, collapse / trap / stagnation, danger zones,
        stop decision, recommended action and notes."""
        cfg = self.config
        records = sorted(history, key=lambda r: (r.revision, r.candidate))
        hist = per_revision(records)
        g = MasterGuidance(target_macs=band.target_macs, global_pruning=True)
        g.multiplier_tuning_order = self._tuning_order(profile)
        g.mac_error_groups = _mac_error_groups(hist)
        deltas = _error_deltas(hist)
        g.delta_r = deltas[-1] if deltas else None
        best = select_best(records)
        self._phase(g, hist, best)
        trap = self._trap(g, hist, best, deltas)
        g.danger_zones = compute_danger_zones(records, profile, cfg.danger_tolerance)
        stop = self._stop_reason(hist, g.first_valid_revision)
        g.recommended_action = self._action(g, stop, trap)
        if stop:
            g.continue_search, g.stop_reason, g.phase = False, stop, "done"
        g.notes = self._notes(g, hist[-1] if hist else None, trap, stop, baseline_accuracy)
        g.rationale = (stop or f"phase {g.phase}; action {g.recommended_action}") + (
            f"; best so far revision {g.best_revision} (acc {best.accuracy})" if g.best_revision is not None else "")
        return g

    # -- analysis steps ----------------------------------------------------------------------
    def _phase(self, g: MasterGuidance, hist: Sequence[RevisionRecord], best: RevisionRecord | None) -> None:
        """Two-phase search: ``find_valid`` until a revision lands in the band, then ``explore``."""
        first_valid = next((r.revision for r in hist if r.is_candidate), None)
        g.first_valid_revision = first_valid
        g.best_revision = best.revision if best is not None and best.is_candidate else None
        g.phase = "find_valid" if first_valid is None else "explore"
        if first_valid is not None:
            g.remaining_extra = max(0, self.config.extra_revisions - (hist[-1].revision - first_valid))

    def _trap(self, g: MasterGuidance, hist: Sequence[RevisionRecord], best: RevisionRecord | None,
              deltas: Sequence[float | None]) -> bool:
        """Sets ``collapse_detected`` and ``stagnating``; returns whether the search is in a local optimum trap."""
        cfg = self.config
        last = hist[-1] if hist else None
        g.collapse_detected = bool(last is not None and last.collapsed)
        recent = hist[-cfg.trap_window:]
        trap = (best is not None and best.is_candidate and not best.collapsed
                and sum(1 for r in recent if r.collapsed) >= cfg.trap_collapses)
        if g.first_valid_revision is None and len(hist) >= cfg.stagnation_window + 1:
            window = deltas[-cfg.stagnation_window:]
            g.stagnating = all(d is None or d > -cfg.stagnation_min_gain_pct for d in window)
        return trap

    def _stop_reason(self, hist: Sequence[RevisionRecord], first_valid: int | None) -> str | None:
        """R_max, the end of the two-phase search, or MAC convergence (early stop); None to continue."""
        cfg = self.config
        if len(hist) >= cfg.max_revisions:
            return f"maximum revisions reached ({cfg.max_revisions})"
        if first_valid is not None and hist[-1].revision - first_valid >= cfg.extra_revisions:
            return (f"two-phase search complete: first valid revision {first_valid}, "
                    f"{cfg.extra_revisions} more explored")
        win = hist[-cfg.early_stop_window:]
        if len(win) == cfg.early_stop_window and all(r.is_candidate and r.accuracy is not None for r in win):
            accs = [r.accuracy for r in win]
            spread = max(accs) - min(accs)
            if spread <= cfg.early_stop_acc_range:
                return (f"MAC convergence: {cfg.early_stop_window} consecutive revisions in band with accuracy "
                        f"spread {spread:.4f} <= {cfg.early_stop_acc_range}")
        return None

    @staticmethod
    def _action(g: MasterGuidance, stop: str | None, trap: bool) -> str:
        if stop:
            return "stop"
        if g.collapse_detected:
            return "conservative_fallback"
        if trap or g.stagnating:
            return "diversify"
        if g.first_valid_revision is not None:
            return "refine"
        return "explore"

    def _notes(self, g: MasterGuidance, last: RevisionRecord | None, trap: bool, stop: str | None,
               baseline_accuracy: float | None) -> list[str]:
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
                self.config.danger_tolerance, ", ".join(str(z.revision) for z in g.danger_zones)))
        if g.phase == "explore" and not stop:
            notes.append(f"phase 2: explore shapes near revision {g.best_revision} for accuracy; "
                         f"{g.remaining_extra} revision(s) left")
        return notes

    @staticmethod
    def _tuning_order(profile: ProfileSummary) -> list[str]:
        if profile.family == "vit":
            return ["mlp_multiplier", "qkv_multiplier"]
        kinds = sorted(profile.mac_share_by_kind, key=lambda k: -profile.mac_share_by_kind[k]) or profile.kinds
        stages = sorted(profile.stages, key=lambda s: -profile.mac_share_by_stage.get(s, 0.0))
        return [f"kind_multipliers.{k}" for k in kinds] + [f"stage_multipliers.{s}" for s in stages]
