"""MAC solver: scale a plan's shape until the pruned model lands on the MAC target.

The strategist (LLM or heuristic) chooses the shape of the allocation (multipliers); the solver
bisects the base ratio with exact analytic MAC predictions (no weights touched), then nudges single
groups by one ``round_to`` step to get as close to the target as channel granularity allows. Only
the answer is really pruned, and its MACs are re-counted with ``count_ops_and_params``.
"""
from __future__ import annotations

import hashlib
import json
import time

from pydantic import BaseModel, ConfigDict, Field

from pruning.groups import Allocation, Cut
from pruning.plan import PruningPlan
from pruning.space import PruningError, PruningSpace
from pruning.units import fmt_macs


class InfeasibleTarget(PruningError):
    """The target lies outside what the plan shape and safety limits can reach."""


def check_below(target_macs: float, base_macs: float) -> None:
    """Raise :class:`InfeasibleTarget` unless the target is below the unpruned model's MACs."""
    if target_macs >= base_macs:
        raise InfeasibleTarget(f"target {fmt_macs(target_macs)} MACs is not below the model's {fmt_macs(base_macs)} MACs")


class MacBand(BaseModel):
    """The asymmetric tolerance band of Eq. 1: ``target*(1-under) <= MACs <= target*(1+over)``."""

    model_config = ConfigDict(extra="forbid")

    target_macs: float = Field(gt=0, description="MACs per sample the pruned model must land on")
    overshoot_pct: float = Field(5.0, ge=0, le=100, description="allowed excess above target, %")
    undershoot_pct: float = Field(15.0, ge=0, lt=100, description="allowed shortfall below target, %")

    @property
    def upper(self) -> float:
        return self.target_macs * (1 + self.overshoot_pct / 100)

    @property
    def lower(self) -> float:
        return self.target_macs * (1 - self.undershoot_pct / 100)

    def contains(self, macs: float) -> bool:
        return self.lower <= macs <= self.upper

    def error_pct(self, macs: float) -> float:
        return (macs - self.target_macs) / self.target_macs * 100


class Solution(BaseModel):
    """A solved allocation: which ratio, how many channels per group, and the predicted MACs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: PruningPlan
    ratio: float
    allocation: dict[int, tuple[int, int]]  # group -> (dims, heads)
    predicted_macs: float
    probes: int
    in_band: bool
    error_pct: float
    granularity_pct: float = Field(description="smallest MAC change of one round_to step near the answer, % of target")
    seconds: float

    def cuts(self) -> Allocation:
        return {g: Cut(dims=d, heads=h) for g, (d, h) in self.allocation.items()}

    def digest(self) -> str:
        """Identity of the pruned model: criterion + channels removed per group (different shapes can solve alike)."""
        items = sorted((int(g), int(d), int(h)) for g, (d, h) in self.allocation.items() if d or h)
        payload = json.dumps([self.plan.importance, self.plan.ignored_layers, items])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _ratio_ceiling(space: PruningSpace, plan: PruningPlan) -> float:
    ms = [plan.multiplier(g.stage, g.kind) for g in space.groups]
    pos = [m for m in ms if m > 0]
    if not pos:
        raise InfeasibleTarget("the plan keeps every group (all multipliers are 0); nothing can be pruned")
    return plan.max_layer_ratio / min(pos)


def solve(space: PruningSpace, plan: PruningPlan, band: MacBand, bisection_steps: int = 40,
          refine_tolerance_pct: float = 0.1) -> Solution:
    """Find the allocation of ``plan``'s shape whose exact MACs are in ``band`` and closest to the target."""
    t0 = time.perf_counter()
    space.validate(plan)
    probes = 0

    def macs_at(r: float) -> tuple[float, Allocation]:
        nonlocal probes
        probes += 1
        alloc = space.allocate(plan, r)
        return space.predict_macs(alloc), alloc

    base = space.base_macs
    check_below(band.target_macs, base)
    hi = _ratio_ceiling(space, plan)
    floor_macs, floor_alloc = macs_at(hi)
    if floor_macs > band.upper:
        raise InfeasibleTarget(
            f"target {fmt_macs(band.target_macs)} MACs is below what this plan can reach within the safety "
            f"limits (max_layer_ratio={plan.max_layer_ratio}); feasible range is {floor_macs / 1e9:.4g}-"
            f"{fmt_macs(base)} MACs"
        )
    lo = 0.0
    best: tuple[float, float, Allocation] | None = None  # (|err|, ratio, alloc)

    def consider(r: float, m: float, alloc: Allocation) -> None:
        nonlocal best
        if m <= band.upper:
            score = abs(m - band.target_macs)
            if best is None or score < best[0]:
                best = (score, r, alloc)

    consider(hi, floor_macs, floor_alloc)
    for _ in range(bisection_steps):
        mid = (lo + hi) / 2
        m, alloc = macs_at(mid)
        consider(mid, m, alloc)
        if m > band.target_macs:
            lo = mid
        else:
            hi = mid
        if best is not None and best[0] / band.target_macs * 100 <= refine_tolerance_pct:
            break
        if hi - lo < 1e-7:
            break
    assert best is not None
    _, ratio, alloc = best
    alloc, extra, granularity = _refine(space, plan, band, alloc, refine_tolerance_pct)
    probes += extra
    macs = space.predict_macs(alloc)
    return Solution(
        plan=plan.scaled(min(ratio, 0.999)), ratio=ratio,
        allocation={g: (c.dims, c.heads) for g, c in alloc.items()},
        predicted_macs=macs, probes=probes, in_band=band.contains(macs), error_pct=band.error_pct(macs),
        granularity_pct=granularity, seconds=time.perf_counter() - t0,
    )


def _refine(space: PruningSpace, plan: PruningPlan, band: MacBand, alloc: Allocation, tol_pct: float,
            max_moves: int = 12) -> tuple[Allocation, int, float]:
    """Greedy single-group moves of one ``round_to`` step that bring the MACs closer to the target.

    Returns the allocation, the number of extra probes, and the smallest MAC step seen (% of target).
    """
    probes = 0
    current = dict(alloc)
    cur_macs = space.predict_macs(current)
    step_min = float("inf")
    for _ in range(max_moves):
        err = cur_macs - band.target_macs
        if abs(err) / band.target_macs * 100 <= tol_pct:
            break
        best_move = None
        for g in space.groups:
            if g.is_attention and plan.multiplier(g.stage, "qkv") == 0:
                continue
            if plan.multiplier(g.stage, g.kind) == 0:
                continue
            cut = current.get(g.index, Cut())
            keep = g.channels - cut.dims
            # over target -> remove one step; under target -> give one step back
            new_keep = keep - plan.round_to if err > 0 else keep + plan.round_to
            min_keep = plan.min_head_dim if g.is_attention else plan.round_to
            if new_keep < max(1, min_keep) or new_keep > g.channels:
                continue
            if (g.channels - new_keep) > g.channels * plan.max_layer_ratio:
                continue
            trial = dict(current)
            trial[g.index] = Cut(dims=g.channels - new_keep, heads=cut.heads)
            m = space.predict_macs(trial)
            probes += 1
            step_min = min(step_min, abs(m - cur_macs))
            if m > band.upper:
                continue
            if abs(m - band.target_macs) < abs(cur_macs - band.target_macs) and (
                best_move is None or abs(m - band.target_macs) < abs(best_move[1] - band.target_macs)
            ):
                best_move = (trial, m)
        if best_move is None:
            break
        current, cur_macs = best_move
    granularity = 0.0 if step_min == float("inf") else step_min / band.target_macs * 100
    return {k: v for k, v in current.items() if v.dims or v.heads}, probes, granularity
