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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pruning.groups import Allocation, Cut
from pruning.mac_model import MacPredictionError
from pruning.plan import PruningPlan
from pruning.space import GroupsFrozen, PruningError, PruningSpace
from pruning.ties import apply_ties, leaders, tie_step
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
    granularity_pct: float = Field(description="smallest MAC change of one alignment step (round_to, finer on narrow groups) near the answer, % of target")
    seconds: float
    source: Literal["analytic", "measured"] = Field(
        "analytic", description="analytic: exact prediction; measured: the MAC model missed, cut copies were counted")
    measured_probes: int = Field(0, description="cut-and-count probes (measured source only)")

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
    """Find the allocation of ``plan``'s shape whose MACs are in ``band`` and closest to the target.

    Analytic (exact predictions, no weights touched) where the space's MAC model matched a measured
    cut; otherwise :func:`solve_measured` (cut copies counted).
    """
    if space.mac_model.exact is False:
        return solve_measured(space, plan, band)
    t0 = time.perf_counter()
    space.validate(plan)
    check_below(band.target_macs, space.base_macs)
    try:
        ratio, alloc, probes = _bisect(space, plan, band, band.target_macs, bisection_steps, refine_tolerance_pct)
        alloc, extra, granularity = _refine(space, plan, band, alloc, refine_tolerance_pct)
        macs = space.predict_macs(alloc, strict=True)
    except MacPredictionError:
        space.mac_model.exact = False
        return solve_measured(space, plan, band)
    return _solution(plan, ratio, alloc, macs, probes + extra, band, granularity, t0)


def _solution(plan: PruningPlan, ratio: float, alloc: Allocation, macs: float, probes: int, band: MacBand,
              granularity: float, t0: float, measured: int = 0) -> Solution:
    return Solution(
        plan=plan.scaled(min(ratio, 0.999)), ratio=ratio,
        allocation={g: (c.dims, c.heads) for g, c in alloc.items()},
        predicted_macs=macs, probes=probes, in_band=band.contains(macs), error_pct=band.error_pct(macs),
        granularity_pct=granularity, seconds=time.perf_counter() - t0, measured_probes=measured,
        source="measured" if measured else "analytic",
    )


def _bisect(space: PruningSpace, plan: PruningPlan, band: MacBand, target: float, steps: int, tol_pct: float,
            macs_of=None) -> tuple[float, Allocation, int]:
    """Bisect the plan's base ratio towards ``target`` (predicted MACs, or ``macs_of(alloc)``), never above
    ``band.upper`` shifted like the target; returns ``(ratio, allocation, probes)``."""
    macs_of = macs_of or (lambda a: space.predict_macs(a, strict=True))
    upper = band.upper + (target - band.target_macs)
    probes = 0

    def macs_at(r: float) -> tuple[float, Allocation]:
        nonlocal probes
        probes += 1
        alloc = space.allocate(plan, r)
        return macs_of(alloc), alloc

    hi = _ratio_ceiling(space, plan)
    floor_macs, floor_alloc = macs_at(hi)
    if floor_macs > upper:
        raise InfeasibleTarget(
            f"target {fmt_macs(band.target_macs)} MACs is below what this plan can reach within the safety "
            f"limits (max_layer_ratio={plan.max_layer_ratio}); feasible range is {floor_macs / 1e9:.4g}-"
            f"{fmt_macs(space.base_macs)} MACs"
        )
    lo = 0.0
    best: tuple[float, float, Allocation] = (abs(floor_macs - target), hi, floor_alloc)
    for _ in range(steps):
        mid = (lo + hi) / 2
        m, alloc = macs_at(mid)
        if m <= upper and abs(m - target) < best[0]:
            best = (abs(m - target), mid, alloc)
        if m > target:
            lo = mid
        else:
            hi = mid
        if best[0] / band.target_macs * 100 <= tol_pct or hi - lo < 1e-7:
            break
    return best[1], best[2], probes


def solve_measured(space: PruningSpace, plan: PruningPlan, band: MacBand, max_measured: int = 12,
                   tolerance_pct: float = 0.25) -> Solution:
    """:func:`_solve_measured`, restarted when a measured cut broke the model and groups were frozen."""
    for _ in range(12):
        try:
            return _solve_measured(space, plan, band, max_measured, tolerance_pct)
        except GroupsFrozen as exc:
            last = exc
    raise PruningError(f"measured cuts keep breaking the model ({last})")


class _Measured:
    """Measured probes of one solve: each allocation counted once; the best answer, the bracket, the
    prediction's error at the last point (``shift``)."""

    def __init__(self, space: PruningSpace, band: MacBand):
        self.space, self.band = space, band
        self.counts: dict[tuple, float] = {}
        self.best: tuple[float, float, Allocation, float] | None = None  # (score, ratio, alloc, macs)
        self.shift = 0.0

    def guide(self, alloc: Allocation) -> float:
        return self.space.predict_macs(alloc, strict=False)

    def measure(self, r: float, alloc: Allocation) -> float:
        key = tuple(sorted((g, c.dims, c.heads) for g, c in alloc.items()))
        if key not in self.counts:
            self.counts[key] = self.space.measure_macs(alloc)
        m = self.counts[key]
        self.shift = m - self.guide(alloc)
        band = self.band
        if m <= band.upper:
            score = abs(m - band.target_macs) if band.contains(m) else band.upper + abs(m - band.target_macs)
            if self.best is None or score < self.best[0]:
                self.best = (score, r, alloc, m)
        return m

    def done(self, tolerance_pct: float) -> bool:
        return self.best is not None and abs(self.band.error_pct(self.best[3])) <= tolerance_pct


def _scan(search: _Measured, space: PruningSpace, plan: PruningPlan, band: MacBand, ceiling: float,
          budget: int, steps: int = 12) -> None:
    """For MACs that are not monotone in the ratio (Torch-Pruning refuses some groups at high ratios):
    count ratios from low to high up to the first one at or below the target, then bisect that step."""
    prev = 0.0
    for k in range(1, steps + 1):
        r = ceiling * k / steps
        if len(search.counts) >= budget + steps or search.measure(r, space.allocate(plan, r)) <= band.target_macs:
            break
        prev = r
    else:
        return
    lo, hi = prev, r
    for _ in range(6):
        if search.done(0.5):
            return
        mid = (lo + hi) / 2
        m = search.measure(mid, space.allocate(plan, mid))
        lo, hi = (mid, hi) if m > band.target_macs else (lo, mid)


def _solve_measured(space: PruningSpace, plan: PruningPlan, band: MacBand, max_measured: int,
                    tolerance_pct: float) -> Solution:
    """The solver for models whose analytic MAC prediction misses: every answer is cut on a copy and counted.

    The prediction still steers: each step solves analytically for the target shifted by the last
    measured error (count minus prediction), then measures that answer; a step that leaves the bracket
    of measured points falls back to bisection. Then single-group ``round_to`` moves (predicted, shifted
    the same way) refine the best answer, each measured. Ends within ``tolerance_pct`` of the target or
    after ``max_measured`` counts, with the best in-band answer seen.
    """
    t0 = time.perf_counter()
    space.validate(plan)
    check_below(band.target_macs, space.base_macs)
    search = _Measured(space, band)
    probes, target = 0, band.target_macs
    lo, hi = 0.0, _ratio_ceiling(space, plan)  # measured MACs above / at-or-below target
    last = None
    while len(search.counts) < max_measured - 2 and not search.done(tolerance_pct) and hi - lo > 1e-6:
        try:
            r, alloc, p = _bisect(space, plan, band, target - search.shift, 40, 0.05, macs_of=search.guide)
        except InfeasibleTarget:
            r, alloc, p = hi, space.allocate(plan, hi), 1
        probes += p
        if last is not None and (not (lo < r < hi) or alloc == last):
            r = (lo + hi) / 2
            alloc = space.allocate(plan, r)
        last = alloc
        m = search.measure(r, alloc)
        if r >= hi and m > band.upper:
            break  # the counted floor is above the band: TP may refuse groups at high ratios, scan below
        lo, hi = (max(lo, r), hi) if m > target else (lo, min(hi, r))
    if not search.done(tolerance_pct) and search.best is None:
        _scan(search, space, plan, band, _ratio_ceiling(space, plan), max_measured)
    while search.best is not None and not search.done(tolerance_pct) and len(search.counts) < max_measured:
        _, r, alloc, m = search.best
        search.shift = m - search.guide(alloc)
        shifted = band.model_copy(update={"target_macs": max(1.0, target - search.shift)})
        refined, extra, _ = _refine(space, plan, shifted, alloc, tolerance_pct, macs_of=search.guide)
        probes += extra
        before = search.best
        search.measure(r, refined)
        if search.best is before:
            break
    if search.best is None:
        raise InfeasibleTarget(
            f"target {fmt_macs(target)} MACs is below every cut of this plan counted within the safety limits "
            f"(max_layer_ratio={plan.max_layer_ratio}; smallest {fmt_macs(min(search.counts.values()))} MACs "
            f"in {len(search.counts)} counted cuts)")
    _, ratio, alloc, m = search.best
    return _solution(plan, ratio, alloc, m, probes, band, 0.0, t0, measured=len(search.counts))


def _refine(space: PruningSpace, plan: PruningPlan, band: MacBand, alloc: Allocation, tol_pct: float,
            max_moves: int = 12, macs_of=None) -> tuple[Allocation, int, float]:
    """Greedy single-group moves that bring the MACs closer to the target: one alignment step of a group,
    or as many steps of it as the remaining error suggests (so a coarse bisection bracket still converges).

    Returns the allocation, the number of extra probes, and the smallest MAC step seen (% of target).
    """
    probes = 0
    current = dict(alloc)
    macs_of = macs_of or (lambda a: space.predict_macs(a, strict=True))
    cur_macs = macs_of(current)
    step_min = float("inf")
    lead = leaders(space.groups, space.ties)
    tied = {f.index for fs in lead.values() for f in fs}  # followers move with their leader only

    def tie(a: Allocation) -> Allocation:
        return apply_ties(space.groups, space.ties, a, lambda g: plan.align(g.channels), plan.min_head_dim)

    for _ in range(max_moves):
        err = cur_macs - band.target_macs
        if abs(err) / band.target_macs * 100 <= tol_pct:
            break
        best_move = None
        for g in space.groups:
            if g.is_attention and plan.multiplier(g.stage, "qkv") == 0:
                continue
            if plan.multiplier(g.stage, g.kind) == 0 or g.index in tied:
                continue
            cut = current.get(g.index, Cut())
            keep = g.channels - cut.dims
            step = plan.align(g.channels)
            if g.index in lead:
                step = tie_step(g, lead[g.index], step) // g.ch_groups
            min_keep = max(1, plan.min_head_dim if g.is_attention else step)
            max_cut = g.channels * plan.max_layer_ratio
            # over target -> remove steps; under target -> give steps back. One step first; when one step
            # is far smaller than the error, also the number of steps that should cover it (one more probe)
            if err > 0:
                room = min(keep - min_keep, int(max_cut) - cut.dims) // step
            else:
                room = (g.channels - keep) // step
            sign, steps = (-1 if err > 0 else 1), min(1, room)
            while steps > 0:
                trial = dict(current)
                trial[g.index] = Cut(dims=g.channels - (keep + sign * steps * step), heads=cut.heads)
                trial = tie(trial)
                m = macs_of(trial)
                probes += 1
                if m <= band.upper and abs(m - band.target_macs) < abs(cur_macs - band.target_macs) and (
                    best_move is None or abs(m - band.target_macs) < abs(best_move[1] - band.target_macs)
                ):
                    best_move = (trial, m)
                if steps > 1:
                    break
                step_min = min(step_min, abs(m - cur_macs))
                more = min(room, int(abs(err) / abs(m - cur_macs))) if m != cur_macs else 0
                steps = more if more > 1 else 0
        if best_move is None:
            break
        current, cur_macs = best_move
    granularity = 0.0 if step_min == float("inf") else step_min / band.target_macs * 100
    return {k: v for k, v in current.items() if v.dims or v.heads}, probes, granularity
