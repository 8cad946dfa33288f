"""Danger zones (Appendix A.3.3 (3)): boxes around failed configurations that no new plan may enter.

Computed by the Master Agent for its guidance and by the safety validator when it has no guidance.
"""
from __future__ import annotations

import re
from typing import Sequence

from agents.history import RevisionRecord, plan_coords
from agents.profiling import ProfileSummary
from agents.schemas import DangerZone
from pruning.plan import default_kind_multiplier

__all__ = ["compute_danger_zones"]

_MOVE = re.compile(r"^((?:stage|kind):[^+\-*]+)[+-]$")


def _blame(r: RevisionRecord, profile: ProfileSummary) -> str | None:
    """The coordinate most likely responsible for a collapse: the move that produced it, else the fragile part."""
    m = _MOVE.match(r.move or "")
    if m:
        return m.group(1)  # 'kind:qkv+' -> 'kind:qkv'
    if profile.family == "vit" and "qkv" in profile.kinds and r.plan.kind_multipliers.get("qkv", default_kind_multiplier("qkv")) > 0:
        return "kind:qkv"
    if "residual" in profile.kinds and r.plan.kind_multipliers.get("residual", default_kind_multiplier("residual")) > 0:
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
